//! Changes told across replicas, through PostgreSQL's LISTEN/NOTIFY.
//!
//! A watcher on one replica must hear promptly of a change another replica
//! committed, and a driver must hear of a cancel accepted elsewhere. Each
//! commit of the log on PostgreSQL (in replica mode) sends, in its own
//! transaction, one notice per changed saga: PostgreSQL delivers it only if
//! the transaction commits, and in commit order. Every replica listens and
//! wakes its own waiters; a replica skips the notices it sent itself, whose
//! waiters it woke already.
//!
//! A notice is a wake-up, not the change: waiters re-read the saga. If the
//! listening connection drops, notices sent meanwhile are lost, so after a
//! reconnect every waiter is woken once to re-read.

use std::time::Duration;

use sqlx::{AnyConnection, postgres::PgListener};
use tokio::sync::watch;
use uuid::Uuid;

use crate::log::SagaStatus;

pub(crate) const CHANGES: &str = "saga_changes";
pub(crate) const RELEASES: &str = "saga_releases";

/// PostgreSQL's limit is 8000 bytes per payload; this leaves room.
const MAX_PAYLOAD: usize = 7_000;

/// One saga's change, as told to the other replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Notice {
    pub saga_id: Uuid,
    /// The status the change set, if it set one.
    pub status: Option<SagaStatus>,
    /// A cancel was accepted: its driver, wherever it runs, must hear of it.
    pub cancel: bool,
}

/// The payloads for `notices`: the sender first, then one line per saga.
pub(crate) fn encode(sender: Uuid, notices: &[Notice]) -> Vec<String> {
    let mut payloads = vec![];
    let mut current = sender.to_string();
    for notice in notices {
        let status = if notice.cancel {
            "CANCEL"
        } else {
            notice.status.map_or("-", SagaStatus::as_str)
        };
        let line = format!("\n{} {status}", notice.saga_id);
        if current.len() + line.len() > MAX_PAYLOAD {
            payloads.push(std::mem::replace(&mut current, sender.to_string()));
        }
        current.push_str(&line);
    }
    payloads.push(current);
    payloads
}

/// The sender and the notices of one payload; `None` if it is not one.
pub(crate) fn decode(payload: &str) -> Option<(Uuid, Vec<Notice>)> {
    let mut lines = payload.lines();
    let sender = Uuid::parse_str(lines.next()?).ok()?;
    let notices = lines
        .map(|line| {
            let (id, status) = line.split_once(' ')?;
            Some(Notice {
                saga_id: Uuid::parse_str(id).ok()?,
                status: SagaStatus::parse(status),
                cancel: status == "CANCEL",
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some((sender, notices))
}

/// Sends `notices` with the caller's transaction.
pub(crate) async fn notify(
    conn: &mut AnyConnection,
    sender: Uuid,
    notices: &[Notice],
) -> Result<(), sqlx::Error> {
    if notices.is_empty() {
        return Ok(());
    }
    for payload in encode(sender, notices) {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGES)
            .bind(payload)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Tells the other replicas, with the caller's transaction, that this one
/// released its sagas: they look for orphans at once rather than at their
/// next tick.
pub(crate) async fn announce_release(
    conn: &mut AnyConnection,
    sender: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(RELEASES)
        .bind(sender.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// What the listener hears.
pub(crate) enum Heard {
    /// Changes another replica committed.
    Changes(Vec<Notice>),
    /// A replica released its sagas.
    Release,
    /// The connection was lost and is back: notices may have been missed.
    Reconnected,
}

/// Listens until `stopping`, handing each thing heard to `on_heard`; skips
/// what this replica (`me`) sent. Reconnects after a failure. `listening`
/// hears once the first LISTEN is in place.
pub(crate) async fn listen(
    url: String,
    me: Uuid,
    mut stopping: watch::Receiver<bool>,
    mut listening: Option<tokio::sync::oneshot::Sender<()>>,
    on_heard: impl Fn(Heard) + Send,
) {
    let mut failures = 0u32;
    while !*stopping.borrow() {
        let mut listener = match connect(&url).await {
            Ok(listener) => listener,
            Err(err) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(error = %err, "cannot listen for the other replicas' changes; retrying");
                }
                let wait = Duration::from_millis(100u64 << failures.min(4));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stopping.wait_for(|s| *s) => return,
                }
                continue;
            }
        };
        if let Some(listening) = listening.take() {
            let _ = listening.send(());
        }
        if failures > 0 {
            on_heard(Heard::Reconnected);
        }
        // Every way out of this loop but stopping is a lost connection.
        loop {
            let next = tokio::select! {
                next = listener.try_recv() => next,
                _ = stopping.wait_for(|s| *s) => return,
            };
            match next {
                Ok(Some(notification)) if notification.channel() == RELEASES => {
                    if notification.payload() != me.to_string() {
                        on_heard(Heard::Release);
                    }
                }
                Ok(Some(notification)) => match decode(notification.payload()) {
                    Some((sender, _)) if sender == me => {}
                    Some((_, notices)) => on_heard(Heard::Changes(notices)),
                    None => tracing::warn!(
                        payload = notification.payload(),
                        "an unreadable saga change notice"
                    ),
                },
                // The connection dropped: reconnect, then wake every waiter.
                Ok(None) => {
                    failures = 1;
                    break;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "lost the connection that listens for changes");
                    failures = 1;
                    break;
                }
            }
        }
    }
}

async fn connect(url: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect(url).await?;
    listener.listen_all([CHANGES, RELEASES]).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_survive_the_payload_and_split_below_the_limit() {
        let sender = Uuid::new_v4();
        let notices: Vec<Notice> = (0..500)
            .map(|i| Notice {
                saga_id: Uuid::new_v4(),
                status: [None, Some(SagaStatus::Completed)][i % 2],
                cancel: i % 7 == 0,
            })
            .collect();
        let payloads = encode(sender, &notices);
        assert!(payloads.len() > 1);
        let mut decoded = vec![];
        for payload in &payloads {
            assert!(payload.len() <= MAX_PAYLOAD);
            let (from, mut some) = decode(payload).unwrap();
            assert_eq!(from, sender);
            decoded.append(&mut some);
        }
        let expected: Vec<Notice> = notices
            .iter()
            .map(|n| Notice {
                status: if n.cancel { None } else { n.status },
                ..*n
            })
            .collect();
        assert_eq!(decoded, expected);
        assert!(decode("not a uuid\nx y").is_none());
    }
}
