//! The sagas this process holds: each is driven by at most one task here,
//! which holds its [`Claim`]; a look that reads whether an open saga needs
//! driving ([`crate::engine::Engine::ensure_driven`]) holds it meanwhile.
//!
//! Whoever finds a saga held leaves it to its holder: a reopen or a cancel
//! committed in the log, a client's replay. The holder may be about to let
//! go without driving it on: a driver that has just ended the saga, a look
//! that read it before the reopen's commit. So a saga found held is marked,
//! and a holder that lets go of a marked saga has it looked at again. Either
//! the newcomer holds the saga, or the holder sees the mark: no order of
//! events leaves a reopened or cancelled saga with nobody driving it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;
use uuid::Uuid;

/// Looks at a saga again: makes sure it is driven if it is open (on a task
/// of its own; called with the holds' lock released).
pub(crate) type LookAgain = Arc<dyn Fn(Uuid) + Send + Sync>;

/// The sagas this process holds, by ID.
pub(crate) struct Holds {
    held: Arc<Mutex<HashMap<Uuid, Held>>>,
    look_again: LookAgain,
}

/// A saga held in this process.
struct Held {
    /// Tells its driver a cancel was accepted.
    cancelled: Arc<Notify>,
    /// Someone found it held and left it to its holder.
    look_again: bool,
}

/// The right to drive one saga in this process; released when dropped.
pub(crate) struct Claim {
    pub(crate) saga_id: Uuid,
    pub(crate) cancelled: Arc<Notify>,
    held: Arc<Mutex<HashMap<Uuid, Held>>>,
    look_again: LookAgain,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let held = self.held.lock().unwrap().remove(&self.saga_id);
        if held.is_some_and(|held| held.look_again) {
            (self.look_again)(self.saga_id);
        }
    }
}

impl Holds {
    pub(crate) fn new(look_again: LookAgain) -> Self {
        Holds {
            held: Arc::default(),
            look_again,
        }
    }

    /// The right to drive `saga_id`; `None` if this process holds it
    /// already, which marks it to be looked at again when its holder lets go.
    pub(crate) fn claim(&self, saga_id: Uuid) -> Option<Claim> {
        let mut held = self.held.lock().unwrap();
        if let Some(holder) = held.get_mut(&saga_id) {
            holder.look_again = true;
            return None;
        }
        let cancelled = Arc::new(Notify::new());
        held.insert(
            saga_id,
            Held {
                cancelled: cancelled.clone(),
                look_again: false,
            },
        );
        Some(Claim {
            saga_id,
            cancelled,
            held: self.held.clone(),
            look_again: self.look_again.clone(),
        })
    }

    /// The cancel signal of `saga_id` if this process holds it, marking it
    /// to be looked at again should its holder let go: the holder may be a
    /// look that read the saga before the cancel, not its driver.
    pub(crate) fn left_to_holder(&self, saga_id: Uuid) -> Option<Arc<Notify>> {
        let mut held = self.held.lock().unwrap();
        let holder = held.get_mut(&saga_id)?;
        holder.look_again = true;
        Some(holder.cancelled.clone())
    }

    pub(crate) fn holds(&self, saga_id: Uuid) -> bool {
        self.held.lock().unwrap().contains_key(&saga_id)
    }

    /// How many sagas are held (driven, waiting for a slot, or looked at).
    pub(crate) fn len(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Holds whose looks again are recorded, not run.
    fn recorded() -> (Holds, Arc<Mutex<Vec<Uuid>>>) {
        let looked = Arc::new(Mutex::new(vec![]));
        let record = looked.clone();
        let holds = Holds::new(Arc::new(move |saga_id| {
            record.lock().unwrap().push(saga_id)
        }));
        (holds, looked)
    }

    #[test]
    fn a_saga_nobody_asked_for_is_let_go_without_a_second_look() {
        let (holds, looked) = recorded();
        let saga = Uuid::new_v4();
        let claim = holds.claim(saga).expect("free");
        assert!(holds.holds(saga));
        drop(claim);
        assert!(!holds.holds(saga));
        assert!(looked.lock().unwrap().is_empty());
        assert!(holds.claim(saga).is_some(), "free again");
    }

    #[test]
    fn a_saga_found_held_is_looked_at_again_once_its_holder_lets_go() {
        let (holds, looked) = recorded();
        let (saga, other) = (Uuid::new_v4(), Uuid::new_v4());
        let holder = holds.claim(saga).expect("free");
        let _other = holds.claim(other).expect("free");
        assert!(holds.claim(saga).is_none(), "left to its holder");
        assert_eq!(holds.len(), 2);
        assert!(looked.lock().unwrap().is_empty(), "not while it is held");
        drop(holder);
        assert_eq!(*looked.lock().unwrap(), vec![saga]);
        // Looked at again with the lock released: the look can claim it.
        assert!(holds.claim(saga).is_some());
    }

    #[test]
    fn a_cancel_left_to_a_holder_signals_it_and_marks_the_saga() {
        let (holds, looked) = recorded();
        let saga = Uuid::new_v4();
        assert!(holds.left_to_holder(saga).is_none(), "nobody holds it");
        let holder = holds.claim(saga).expect("free");
        let signal = holds.left_to_holder(saga).expect("held");
        assert!(Arc::ptr_eq(&signal, &holder.cancelled));
        drop(holder);
        assert_eq!(*looked.lock().unwrap(), vec![saga]);
    }
}
