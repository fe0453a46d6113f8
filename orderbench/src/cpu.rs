//! CPU time per process, read from `/proc`, so a run can say what one saga
//! costs each process of the system (Linux only; elsewhere nothing is found).
//!
//! The services are found by the port they listen on (so it works the same for
//! separate binaries and for devstack's children), PostgreSQL by its process
//! name (every backend counts).
//!
//! A service's CPU is also split by thread name (tokio's workers, a store's
//! writer thread, the saga log's), from `/proc/PID/task`: a change to one
//! thread's work shows there when the whole process's figure, ±15 % from
//! run to run, hides it. A thread that ended between the two samples is
//! not counted (the system's threads live as long as their process).

use std::{collections::BTreeMap, fs};

/// Linux reports CPU time in clock ticks of `USER_HZ`, which is 100 on every
/// architecture Linux supports for user space.
const TICKS_PER_SECOND: f64 = 100.0;

/// A process group to account: a name and how to find its processes.
#[derive(Debug, Clone)]
pub enum Target {
    /// The process listening on this TCP port.
    Port(&'static str, u16),
    /// Every process with this command name (`/proc/<pid>/comm`).
    Comm(&'static str, &'static str),
    /// This process.
    Own(&'static str),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Port(name, _) | Target::Comm(name, _) | Target::Own(name) => name,
        }
    }
}

/// CPU seconds used so far, by target name; targets not found are absent.
/// For the targets found by port, also by thread: (target, thread name) →
/// (thread ID, its start time: an ID the kernel gave again is another
/// thread) → seconds.
#[derive(Debug, Clone, Default)]
pub struct Sample(
    BTreeMap<&'static str, BTreeMap<u32, f64>>,
    BTreeMap<(&'static str, String), ThreadTimes>,
);

/// CPU seconds by (thread ID, start time).
type ThreadTimes = BTreeMap<(u32, u64), f64>;

pub fn sample(targets: &[Target]) -> Sample {
    let mut sample = Sample::default();
    for target in targets {
        let pids = match target {
            Target::Port(_, port) => listening_pid(*port).into_iter().collect(),
            Target::Comm(_, comm) => pids_named(comm),
            Target::Own(_) => vec![std::process::id()],
        };
        if let Target::Port(name, _) = target {
            for pid in &pids {
                for (tid, thread, seconds) in threads(*pid) {
                    sample
                        .1
                        .entry((name, thread))
                        .or_default()
                        .insert(tid, seconds);
                }
            }
        }
        let times: BTreeMap<u32, f64> = pids
            .into_iter()
            .filter_map(|pid| cpu_seconds(&format!("/proc/{pid}/stat")).map(|s| (pid, s)))
            .collect();
        if !times.is_empty() {
            // Several targets may share a name (the orchestrator's replicas): summed.
            sample.0.entry(target.name()).or_default().extend(times);
        }
    }
    sample
}

/// CPU milliseconds each target used between two samples, divided by `per`.
/// A process that started in between counts from zero.
pub fn per_unit(before: &Sample, after: &Sample, per: f64) -> BTreeMap<&'static str, f64> {
    after
        .0
        .iter()
        .map(|(name, pids)| {
            let used: f64 = pids
                .iter()
                .map(|(pid, now)| {
                    let then = before.0.get(name).and_then(|b| b.get(pid)).copied();
                    now - then.unwrap_or(0.0)
                })
                .sum();
            (*name, used * 1000.0 / per.max(1.0))
        })
        .collect()
}

/// CPU milliseconds each thread name of each target used between two
/// samples, divided by `per`: target → thread name → milliseconds.
pub fn per_unit_by_thread(
    before: &Sample,
    after: &Sample,
    per: f64,
) -> BTreeMap<&'static str, BTreeMap<String, f64>> {
    let mut by_target: BTreeMap<&'static str, BTreeMap<String, f64>> = BTreeMap::new();
    for ((target, thread), tids) in &after.1 {
        let used: f64 = tids
            .iter()
            .map(|(tid, now)| {
                let then = before
                    .1
                    .get(&(*target, thread.clone()))
                    .and_then(|b| b.get(tid))
                    .copied();
                now - then.unwrap_or(0.0)
            })
            .sum();
        by_target
            .entry(target)
            .or_default()
            .insert(thread.clone(), used * 1000.0 / per.max(1.0));
    }
    by_target
}

/// The per-thread line: `orchestrator: tokio-rt-worker 0.251, saga-log-sqlite
/// 0.130; stock: …`, in milliseconds, threads that used none left out.
pub fn describe_by_thread(figures: &BTreeMap<&'static str, BTreeMap<String, f64>>) -> String {
    let parts: Vec<String> = figures
        .iter()
        .filter_map(|(target, threads)| {
            let used: Vec<String> = threads
                .iter()
                .filter(|(_, ms)| **ms >= 0.0005)
                .map(|(thread, ms)| format!("{thread} {ms:.3}"))
                .collect();
            (!used.is_empty()).then(|| format!("{target}: {}", used.join(", ")))
        })
        .collect();
    parts.join("; ")
}

/// A report line's figures: `name value unit` for each target, e.g.
/// `orchestrator 0.52 ms  stock 0.14 ms`.
pub fn describe(figures: &BTreeMap<&'static str, f64>, unit: &str) -> String {
    let parts: Vec<String> = figures
        .iter()
        .map(|(name, value)| format!("{name} {value:.2}{unit}"))
        .collect();
    parts.join("  ")
}

/// Each thread of `pid`: its ID and start time, its name and its CPU
/// seconds so far.
fn threads(pid: u32) -> Vec<((u32, u64), String, f64)> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    entries
        .filter_map(|entry| {
            let tid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let name = fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            let (seconds, started) = cpu_and_start(&format!("/proc/{pid}/task/{tid}/stat"))?;
            Some(((tid, started), name.trim().to_owned(), seconds))
        })
        .collect()
}

/// utime + stime of a `stat` file of `/proc` (a process's or a thread's).
fn cpu_seconds(stat_path: &str) -> Option<f64> {
    cpu_and_start(stat_path).map(|(seconds, _)| seconds)
}

/// utime + stime of a `stat` file of `/proc`, and its start time (in ticks
/// since boot).
fn cpu_and_start(stat_path: &str) -> Option<(f64, u64)> {
    let stat = fs::read_to_string(stat_path).ok()?;
    // The command name may hold spaces; the fields after its ')' are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after
    // ')'; starttime is field 22, 19 after it.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let started: u64 = fields.get(19)?.parse().ok()?;
    Some(((utime + stime) / TICKS_PER_SECOND, started))
}

fn pids_named(comm: &str) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

fn all_pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The process that owns the listening socket on `port` (IPv4 or IPv6).
fn listening_pid(port: u16) -> Option<u32> {
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| fs::read_to_string(path).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields.get(1)?.rsplit(':').next()?;
                    // State 0A is LISTEN.
                    (u16::from_str_radix(local_port, 16).ok()? == port && *fields.get(3)? == "0A")
                        .then(|| fields.get(9).map(|i| i.to_string()))
                        .flatten()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    all_pids().into_iter().find(|pid| {
        fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
                .any(|link| wanted.iter().any(|w| link.to_str() == Some(w)))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_measures_a_listening_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listening_pid(port), Some(std::process::id()));
        let before = sample(&[Target::Port("me", port)]);
        // Burn some CPU so the difference is visible.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(100) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let after = sample(&[Target::Port("me", port)]);
        let used = per_unit(&before, &after, 1.0);
        assert!(used["me"] > 0.0, "{used:?}");
    }

    #[test]
    fn splits_a_process_by_thread_name() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let targets = [Target::Port("me", port)];
        // The thread burns between the samples, and lives until both are
        // taken: one that ended is gone from /proc.
        let (to_burner, burner_hears) = std::sync::mpsc::channel::<()>();
        let (to_test, test_hears) = std::sync::mpsc::channel::<()>();
        let burner = std::thread::Builder::new()
            .name("cpu-test-burn".into())
            .spawn(move || {
                to_test.send(()).unwrap();
                burner_hears.recv().unwrap();
                // 150 ms of this thread's own CPU, however long a loaded
                // machine takes to give it.
                let own = || cpu_seconds("/proc/thread-self/stat").unwrap();
                let start = own();
                let mut x = 0u64;
                while own() - start < 0.15 {
                    for _ in 0..100_000 {
                        x = x.wrapping_mul(31).wrapping_add(7);
                    }
                }
                std::hint::black_box(x);
                to_test.send(()).unwrap();
                burner_hears.recv().unwrap();
            })
            .unwrap();
        test_hears.recv().unwrap();
        let before = sample(&targets);
        to_burner.send(()).unwrap();
        test_hears.recv().unwrap();
        let after = sample(&targets);
        to_burner.send(()).unwrap();
        burner.join().unwrap();
        let by_thread = per_unit_by_thread(&before, &after, 1.0);
        let burnt = by_thread["me"]["cpu-test-burn"];
        // 150 ms by its own count; at least 100 in the samples, whose
        // ticks are 10 ms.
        assert!(burnt >= 100.0, "{by_thread:?}");
        assert!(
            describe_by_thread(&by_thread).contains("me: "),
            "{}",
            describe_by_thread(&by_thread)
        );
    }
}
