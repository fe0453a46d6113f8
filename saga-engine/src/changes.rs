//! Who hears of a committed change of a saga: the tasks waiting on that saga
//! (a `CreateOrder` with `wait`, a watch stream), each saga with a channel of
//! its own, so that a change wakes only them. With one broadcast for all,
//! every change woke every waiter: at 64 waiting calls, 64 wake-ups per change.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;
use uuid::Uuid;

use crate::log::{SagaStatus, SagaView};

/// A committed change of a saga, as told to waiters and watchers.
#[derive(Debug, Clone)]
pub struct SagaChange {
    pub saga_id: Uuid,
    /// The saga's status after the change, when the change set it.
    pub status: Option<SagaStatus>,
    /// The whole saga as the change left it, when it ended the saga and its
    /// driver knows it so (it recorded the saga and drove it from there):
    /// its waiters need not read it from the log.
    pub view: Option<Arc<SagaView>>,
}

/// What the watchers of one saga were told last.
#[derive(Debug, Clone, Default)]
struct Told {
    status: Option<SagaStatus>,
    view: Option<Arc<SagaView>>,
}

type Watchers = Arc<Mutex<HashMap<Uuid, watch::Sender<Told>>>>;

pub(crate) struct Changes {
    one: Watchers,
}

impl Changes {
    pub(crate) fn new() -> Self {
        Changes {
            one: Arc::default(),
        }
    }

    pub(crate) fn watch(&self, saga_id: Uuid) -> SagaWatch {
        let mut one = self.one.lock().unwrap();
        let receiver = match one.get(&saga_id) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = watch::channel(Told::default());
                one.insert(saga_id, sender);
                receiver
            }
        };
        SagaWatch {
            saga_id,
            receiver: Some(receiver),
            watchers: self.one.clone(),
        }
    }

    /// Whether anyone waits on this saga's changes now.
    pub(crate) fn is_watched(&self, saga_id: Uuid) -> bool {
        self.one.lock().unwrap().contains_key(&saga_id)
    }

    /// Wakes every waiter to re-read its saga (changes may have been missed).
    pub(crate) fn publish_all(&self) {
        for sender in self.one.lock().unwrap().values() {
            tell(sender, Told::default());
        }
    }

    /// A saga that had ended runs again (an operator reopened it): unlike
    /// any other word, this one replaces the end its watchers were told,
    /// and the saga as it ended with it.
    pub(crate) fn reopened(&self, saga_id: Uuid, status: SagaStatus) {
        if let Some(sender) = self.one.lock().unwrap().get(&saga_id) {
            sender.send_replace(Told {
                status: Some(status),
                view: None,
            });
        }
    }

    pub(crate) fn publish(&self, change: SagaChange) {
        if let Some(sender) = self.one.lock().unwrap().get(&change.saga_id) {
            tell(
                sender,
                Told {
                    status: change.status,
                    view: change.view,
                },
            );
        }
    }
}

/// Wakes the saga's watchers with `status`, even when it is the same value
/// (every change wakes), unless they were told a terminal status: that one
/// stands. A late word without a status (a replica's own "cancel accepted",
/// told after the driver on another replica already ended the saga) once
/// replaced CANCELLED before a watcher read it, and the watcher waited
/// forever.
fn tell(sender: &watch::Sender<Told>, told: Told) {
    sender.send_if_modified(|current| {
        if current.status.is_some_and(SagaStatus::is_terminal) {
            return false;
        }
        *current = told;
        true
    });
}

/// Wakes when one saga changes. Created before the caller reads the saga, it
/// misses no change committed after that point.
pub struct SagaWatch {
    saga_id: Uuid,
    receiver: Option<watch::Receiver<Told>>,
    watchers: Watchers,
}

impl SagaWatch {
    /// Returns once the saga has changed since the last call (or since this
    /// watch was made), with the status the latest change set, if it set one.
    /// Changes that came together are told as one, the latest; a terminal
    /// status is never followed by another.
    pub async fn changed(&mut self) -> Option<SagaStatus> {
        let receiver = self.receiver.as_mut().expect("present until dropped");
        // The sender lives as long as any receiver (it leaves the map only
        // when the last one drops), so this can't fail while we hold one.
        let _ = receiver.changed().await;
        receiver.borrow_and_update().status
    }

    /// The saga as its end left it, once a change that ended it was told
    /// with it (see [`SagaChange::view`]).
    pub fn final_view(&self) -> Option<Arc<SagaView>> {
        let receiver = self.receiver.as_ref().expect("present until dropped");
        let told = receiver.borrow();
        told.status
            .is_some_and(SagaStatus::is_terminal)
            .then(|| told.view.clone())
            .flatten()
    }
}

impl Drop for SagaWatch {
    fn drop(&mut self) {
        let mut watchers = self.watchers.lock().unwrap();
        drop(self.receiver.take());
        if watchers
            .get(&self.saga_id)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            watchers.remove(&self.saga_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_change_wakes_the_watchers_of_its_saga_only() {
        let changes = Changes::new();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut watch_a = changes.watch(a);
        let mut watch_b = changes.watch(b);
        changes.publish(SagaChange {
            saga_id: a,
            status: None,
            view: None,
        });
        tokio::time::timeout(Duration::from_secs(1), watch_a.changed())
            .await
            .expect("the watcher of a is woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), watch_b.changed())
                .await
                .is_err(),
            "the watcher of b must not wake for a change of a"
        );
    }

    #[tokio::test]
    async fn a_terminal_status_is_never_replaced_by_a_later_word() {
        let changes = Changes::new();
        let saga = Uuid::new_v4();
        let mut watch = changes.watch(saga);
        changes.publish(SagaChange {
            saga_id: saga,
            view: None,
            status: Some(SagaStatus::Cancelled),
        });
        // Told before the watcher read the first: it must not hide it.
        changes.publish(SagaChange {
            saga_id: saga,
            status: None,
            view: None,
        });
        changes.publish_all();
        assert_eq!(watch.changed().await, Some(SagaStatus::Cancelled));
    }

    #[tokio::test]
    async fn a_reopened_saga_replaces_the_end_its_watchers_were_told() {
        let changes = Changes::new();
        let saga = Uuid::new_v4();
        let mut watch = changes.watch(saga);
        let ended = SagaView {
            saga_id: saga,
            kind: "test".into(),
            data_json: "{}".into(),
            status: SagaStatus::NeedsAttention,
            pivot_passed: false,
            cancel_requested: false,
            failure_reason: "stuck".into(),
            trace_context: String::new(),
            created_at_ms: 1,
            updated_at_ms: 2,
            steps: vec![],
        };
        changes.publish(SagaChange {
            saga_id: saga,
            status: Some(SagaStatus::NeedsAttention),
            view: Some(Arc::new(ended)),
        });
        assert_eq!(watch.changed().await, Some(SagaStatus::NeedsAttention));
        assert!(watch.final_view().is_some());
        changes.reopened(saga, SagaStatus::Compensating);
        assert_eq!(watch.changed().await, Some(SagaStatus::Compensating));
        assert!(watch.final_view().is_none(), "the end before the reopen");
    }

    #[tokio::test]
    async fn the_last_watch_dropped_removes_its_entry() {
        let changes = Changes::new();
        let saga = Uuid::new_v4();
        let first = changes.watch(saga);
        let second = changes.watch(saga);
        drop(first);
        assert_eq!(changes.one.lock().unwrap().len(), 1);
        drop(second);
        assert!(changes.one.lock().unwrap().is_empty());
    }
}
