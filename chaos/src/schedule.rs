//! The faults of a run, drawn from a seed before the run begins, so that the
//! same seed and the same commit replay the same schedule.

use std::fmt;

use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};

/// A process the runner can kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Victim {
    Orchestrator,
    Stock,
    Shipping,
    Payment,
    /// The PostgreSQL server: the postmaster and every backend.
    Postgres,
}

impl Victim {
    pub const SERVICES: [Victim; 4] = [
        Victim::Orchestrator,
        Victim::Stock,
        Victim::Shipping,
        Victim::Payment,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Victim::Orchestrator => "orchestrator",
            Victim::Stock => "stock-svc",
            Victim::Shipping => "shipping-svc",
            Victim::Payment => "payment-svc",
            Victim::Postgres => "postgres",
        }
    }
}

/// A link from the orchestrator to a domain service, through a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Link {
    Stock,
    Shipping,
    Payment,
}

impl Link {
    pub const ALL: [Link; 3] = [Link::Stock, Link::Shipping, Link::Payment];

    pub fn name(self) -> &'static str {
        match self {
            Link::Stock => "orchestrator→stock",
            Link::Shipping => "orchestrator→shipping",
            Link::Payment => "orchestrator→payment",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, then a restart right after.
    Kill(Victim),
    /// Every open connection on the link reset (RST), calls in the middle of
    /// their exchange included.
    Reset(Link),
    /// Bytes held back in both directions until it heals: calls run into
    /// their deadline.
    Blackhole { link: Link, for_ms: u64 },
    /// Every chunk forwarded late.
    Latency {
        link: Link,
        added_ms: u64,
        for_ms: u64,
    },
    /// Open connections reset and new ones refused until it heals.
    Partition { link: Link, for_ms: u64 },
    /// The orchestrator's connection to RabbitMQ cut (reset and refused).
    BrokerCut { for_ms: u64 },
}

impl Fault {
    /// The row of the report's table it counts in.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill(Victim::Orchestrator) => "kill -9 orchestrator",
            Fault::Kill(Victim::Stock) => "kill -9 stock-svc",
            Fault::Kill(Victim::Shipping) => "kill -9 shipping-svc",
            Fault::Kill(Victim::Payment) => "kill -9 payment-svc",
            Fault::Kill(Victim::Postgres) => "kill -9 postgres",
            Fault::Reset(_) => "connection reset",
            Fault::Blackhole { .. } => "blackhole",
            Fault::Latency { .. } => "added latency",
            Fault::Partition { .. } => "partition",
            Fault::BrokerCut { .. } => "broker cut",
        }
    }

    /// How long the fault lasts (0 for a kill or a reset).
    pub fn lasts_ms(&self) -> u64 {
        match *self {
            Fault::Kill(_) | Fault::Reset(_) => 0,
            Fault::Blackhole { for_ms, .. }
            | Fault::Latency { for_ms, .. }
            | Fault::Partition { for_ms, .. }
            | Fault::BrokerCut { for_ms } => for_ms,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Fault::Kill(victim) => write!(f, "kill -9 {}", victim.name()),
            Fault::Reset(link) => write!(f, "reset every connection on {}", link.name()),
            Fault::Blackhole { link, for_ms } => {
                write!(f, "blackhole {} for {for_ms} ms", link.name())
            }
            Fault::Latency {
                link,
                added_ms,
                for_ms,
            } => write!(f, "+{added_ms} ms on {} for {for_ms} ms", link.name()),
            Fault::Partition { link, for_ms } => {
                write!(f, "partition {} for {for_ms} ms", link.name())
            }
            Fault::BrokerCut { for_ms } => write!(f, "cut the broker for {for_ms} ms"),
        }
    }
}

/// A fault and when it strikes, counted from the start of the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    pub at_ms: u64,
    pub fault: Fault,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub seed: u64,
    pub faults: Vec<Planned>,
}

/// How much chaos.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// One fault of every kind (one kill of every process), in a random order.
    Short,
    /// A kill every 2–5 s and a network fault every 3–8 s for `for_ms`, and a
    /// broker cut every 60–90 s.
    Long { for_ms: u64 },
    /// No fault at all (to check the audit itself, with a planted fault).
    None,
}

impl Schedule {
    /// The schedule of `profile` for `seed`. PostgreSQL is a victim only when
    /// the run is on PostgreSQL.
    pub fn new(profile: Profile, seed: u64, with_postgres: bool) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut victims = Victim::SERVICES.to_vec();
        if with_postgres {
            victims.push(Victim::Postgres);
        }
        let faults = match profile {
            Profile::None => vec![],
            Profile::Short => {
                let mut kinds: Vec<Fault> = victims.iter().map(|v| Fault::Kill(*v)).collect();
                kinds.push(Fault::Reset(pick_link(&mut rng)));
                kinds.push(blackhole(&mut rng));
                kinds.push(latency(&mut rng));
                kinds.push(partition(&mut rng));
                kinds.push(Fault::BrokerCut { for_ms: 30_000 });
                kinds.shuffle(&mut rng);
                let mut at_ms = 0;
                kinds
                    .into_iter()
                    .map(|fault| {
                        at_ms += rng.random_range(2_000..=5_000);
                        Planned { at_ms, fault }
                    })
                    .collect()
            }
            Profile::Long { for_ms } => {
                let mut faults = vec![];
                let mut at_ms = rng.random_range(2_000..=5_000);
                while at_ms < for_ms {
                    let victim = victims[rng.random_range(0..victims.len())];
                    faults.push(Planned {
                        at_ms,
                        fault: Fault::Kill(victim),
                    });
                    at_ms += rng.random_range(2_000..=5_000);
                }
                let mut at_ms = rng.random_range(3_000..=8_000);
                while at_ms < for_ms {
                    let fault = match rng.random_range(0..4) {
                        0 => Fault::Reset(pick_link(&mut rng)),
                        1 => blackhole(&mut rng),
                        2 => latency(&mut rng),
                        _ => partition(&mut rng),
                    };
                    faults.push(Planned { at_ms, fault });
                    at_ms += rng.random_range(3_000..=8_000);
                }
                let mut at_ms = rng.random_range(10_000..=30_000);
                while at_ms < for_ms {
                    faults.push(Planned {
                        at_ms,
                        fault: Fault::BrokerCut { for_ms: 30_000 },
                    });
                    at_ms += rng.random_range(60_000..=90_000);
                }
                faults.sort_by_key(|p| p.at_ms);
                faults
            }
        };
        Schedule { seed, faults }
    }

    /// Only the kills: to measure recovery from a crash with nothing else
    /// in the way.
    pub fn kills_only(mut self) -> Schedule {
        self.faults.retain(|p| matches!(p.fault, Fault::Kill(_)));
        self
    }

    /// When the last fault has healed.
    pub fn end_ms(&self) -> u64 {
        self.faults
            .iter()
            .map(|p| p.at_ms + p.fault.lasts_ms())
            .max()
            .unwrap_or(0)
    }
}

fn pick_link(rng: &mut StdRng) -> Link {
    Link::ALL[rng.random_range(0..Link::ALL.len())]
}

fn blackhole(rng: &mut StdRng) -> Fault {
    Fault::Blackhole {
        link: pick_link(rng),
        for_ms: rng.random_range(2_000..=6_000),
    }
}

fn latency(rng: &mut StdRng) -> Fault {
    Fault::Latency {
        link: pick_link(rng),
        added_ms: rng.random_range(50..=500),
        for_ms: rng.random_range(3_000..=10_000),
    }
}

fn partition(rng: &mut StdRng) -> Fault {
    Fault::Partition {
        link: pick_link(rng),
        for_ms: rng.random_range(5_000..=30_000),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_seed_replays_its_schedule_and_another_seed_does_not() {
        for profile in [Profile::Short, Profile::Long { for_ms: 120_000 }] {
            assert_eq!(
                Schedule::new(profile, 7, true),
                Schedule::new(profile, 7, true)
            );
            assert_ne!(
                Schedule::new(profile, 7, true).faults,
                Schedule::new(profile, 8, true).faults
            );
        }
    }

    #[test]
    fn the_short_profile_has_every_kind_once_two_to_five_seconds_apart() {
        for seed in 0..50 {
            let schedule = Schedule::new(Profile::Short, seed, true);
            let mut kinds = BTreeMap::new();
            for planned in &schedule.faults {
                *kinds.entry(planned.fault.kind()).or_insert(0) += 1;
            }
            assert_eq!(kinds.len(), 10, "{kinds:?}");
            assert!(kinds.values().all(|n| *n == 1), "{kinds:?}");
            let mut last = 0;
            for planned in &schedule.faults {
                assert!((2_000..=5_000).contains(&(planned.at_ms - last)));
                last = planned.at_ms;
            }
        }
        let on_sqlite = Schedule::new(Profile::Short, 1, false);
        assert_eq!(on_sqlite.faults.len(), 9);
        assert!(
            on_sqlite
                .faults
                .iter()
                .all(|p| p.fault != Fault::Kill(Victim::Postgres))
        );
    }

    #[test]
    fn the_long_profile_kills_every_two_to_five_seconds() {
        let schedule = Schedule::new(Profile::Long { for_ms: 300_000 }, 3, true);
        let kills: Vec<u64> = schedule
            .faults
            .iter()
            .filter(|p| matches!(p.fault, Fault::Kill(_)))
            .map(|p| p.at_ms)
            .collect();
        assert!(
            kills
                .windows(2)
                .all(|w| (2_000..=5_000).contains(&(w[1] - w[0])))
        );
        assert!(kills.len() >= 300_000 / 5_000 - 1);
        for kind in [
            "kill -9 postgres",
            "kill -9 orchestrator",
            "partition",
            "blackhole",
            "broker cut",
        ] {
            assert!(
                schedule.faults.iter().any(|p| p.fault.kind() == kind),
                "{kind}"
            );
        }
    }
}
