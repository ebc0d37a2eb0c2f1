//! LISTEN for the queue's notifications on a connection of its own, reconnecting when the
//! database goes away. Notifications are hints: after a reconnect (when some may have been
//! missed) the listener says so, and workers re-poll.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::{mpsc, watch};

use super::Queue;

/// Channel on which a job that became claimable is announced (payload: its id).
pub const QUEUED_CHANNEL: &str = "kiln_jobs_queued";
/// Channel on which a cancel or pause request for a running job is announced (payload: id).
pub const CONTROL_CHANNEL: &str = "kiln_jobs_control";

/// What the listener reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A job became claimable.
    Queued(String),
    /// A running job was asked to cancel or pause.
    Control(String),
    /// The connection was (re)established: notifications may have been missed.
    Reconnected,
}

/// Spawns the listener task; it runs until `stop` turns true. Notices arrive on the
/// returned channel (bounded: when the consumer lags, notices are dropped, which polling
/// covers).
pub fn spawn_listener(queue: &Queue, mut stop: watch::Receiver<bool>) -> mpsc::Receiver<Notice> {
    let (tx, rx) = mpsc::channel(1024);
    let pool = queue.pool().clone();
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(100);
        loop {
            if *stop.borrow() {
                return;
            }
            let listener = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                listener
                    .listen_all([QUEUED_CHANNEL, CONTROL_CHANNEL])
                    .await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let listener = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                l = listener => l,
            };
            let mut l = match listener {
                Ok(l) => {
                    delay = Duration::from_millis(100);
                    let _ = tx.try_send(Notice::Reconnected);
                    l
                }
                Err(e) => {
                    tracing::debug!(error = %e, "job listener cannot connect; retrying");
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    n = l.try_recv() => n,
                };
                match next {
                    Ok(Some(n)) => {
                        let id = n.payload().to_owned();
                        let notice = if n.channel() == CONTROL_CHANNEL {
                            Notice::Control(id)
                        } else {
                            Notice::Queued(id)
                        };
                        let _ = tx.try_send(notice);
                    }
                    // The connection dropped; PgListener reconnects on the next call.
                    Ok(None) => {
                        let _ = tx.try_send(Notice::Reconnected);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "job listener lost its connection");
                        break;
                    }
                }
            }
        }
    });
    rx
}
