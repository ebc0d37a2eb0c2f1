//! The worker pool: claims jobs from the [`Queue`](crate::queue::Queue), runs each on a
//! dedicated OS thread through a [`JobExecutor`], heartbeats its lease, forwards progress
//! and checkpoints, and records how the attempt ended.
//!
//! One dispatcher task per process owns the slots. It claims when woken by a NOTIFY, when a
//! slot frees up, and every `poll_interval` (NOTIFY is only a hint). On shutdown it stops
//! claiming and asks running attempts to checkpoint and stop; they are requeued without
//! charging an attempt.

mod engine;
mod slot;
mod training;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::artifacts::Artifacts;
use crate::queue::notify::{Notice, spawn_listener};
use crate::queue::{Queue, QueueConfig};
use crate::store::Store;

pub use engine::{
    JobContext, JobExecutor, JobFailure, JobOutcome, JobSpec, Level, Metrics, Progress, ResumeFrom,
    StopReason,
};
pub(crate) use slot::model_key;
pub use training::{EngineExecutor, EstimateRequest, estimate};

/// How this process runs jobs.
#[derive(Clone)]
pub struct WorkerSettings {
    /// Training slots (jobs run at once by this process); 0 runs none.
    pub slots: usize,
    /// The training engine (kiln's own by default). `None`: every job fails with "no
    /// training engine configured".
    pub executor: Option<Arc<dyn JobExecutor>>,
    /// Lease and retry policy.
    pub queue: QueueConfig,
    /// How often to look for work without a NOTIFY.
    pub poll_interval: Duration,
    /// How often this process requeues jobs whose lease expired.
    pub reap_interval: Duration,
    /// How long shutdown waits for running attempts to checkpoint and stop.
    pub shutdown_grace: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            slots: 1,
            executor: Some(Arc::new(EngineExecutor::cpu())),
            queue: QueueConfig::default(),
            poll_interval: Duration::from_secs(2),
            reap_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(60),
        }
    }
}

impl fmt::Debug for WorkerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerSettings")
            .field("slots", &self.slots)
            .field("executor", &self.executor.as_ref().map(|_| "configured"))
            .field("queue", &self.queue)
            .field("poll_interval", &self.poll_interval)
            .field("reap_interval", &self.reap_interval)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

/// What a running attempt can be told from outside its task.
pub(crate) struct SlotControl {
    pub(crate) stop: Arc<engine::StopFlag>,
    /// Wakes the heartbeat at once (a cancel or pause NOTIFY arrived).
    pub(crate) poke: Notify,
}

/// State shared by the dispatcher and its slots.
pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) queue: Queue,
    pub(crate) artifacts: Artifacts,
    pub(crate) models_dir: PathBuf,
    pub(crate) executor: Option<Arc<dyn JobExecutor>>,
    pub(crate) worker_id: String,
    pub(crate) running: Mutex<HashMap<String, Arc<SlotControl>>>,
    pub(crate) shutting_down: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<SlotControl>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running pool. Call [`WorkerPool::shutdown`] to stop it gracefully.
pub struct WorkerPool {
    worker_id: String,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// A worker id unique to this process start: host, pid and a random part.
fn new_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..8])
}

impl WorkerPool {
    /// Starts the reaper and, with at least one slot, the listener and the dispatcher.
    pub fn start(
        store: Store,
        artifacts: Artifacts,
        models_dir: PathBuf,
        settings: WorkerSettings,
    ) -> WorkerPool {
        let queue = Queue::new(&store, settings.queue.clone());
        let (stop, stopped) = watch::channel(false);
        let worker_id = new_worker_id();
        let mut tasks = vec![tokio::spawn(reap_forever(
            queue.clone(),
            settings.reap_interval,
            stopped.clone(),
        ))];
        if settings.slots > 0 {
            let shared = Arc::new(Shared {
                store,
                queue: queue.clone(),
                artifacts,
                models_dir,
                executor: settings.executor.clone(),
                worker_id: worker_id.clone(),
                running: Mutex::new(HashMap::new()),
                shutting_down: false.into(),
            });
            let notices = spawn_listener(&queue, stopped.clone());
            tasks.push(tokio::spawn(dispatch(shared, settings, notices, stopped)));
            tracing::info!(worker = %worker_id, "job worker started");
        }
        WorkerPool {
            worker_id,
            stop,
            tasks,
        }
    }

    /// This process's worker id (as recorded on the jobs it runs).
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Stops claiming, asks running attempts to checkpoint and stop, and waits for them to
    /// be requeued (up to the shutdown grace period).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn reap_forever(queue: Queue, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(every) => {}
        }
        match queue.reap_expired_leases().await {
            Ok(moved) => {
                for (job, state) in moved {
                    tracing::warn!(%job, %state, "reaped a job whose lease expired");
                }
            }
            Err(e) => tracing::debug!(error = %e, "reaper could not run"),
        }
    }
}

async fn dispatch(
    shared: Arc<Shared>,
    settings: WorkerSettings,
    mut notices: mpsc::Receiver<Notice>,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(settings.slots));
    let freed = Arc::new(Notify::new());
    let mut slots = JoinSet::new();
    let mut tick = tokio::time::interval(settings.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut listening = true;
    loop {
        // Claim while there are free slots and claimable jobs.
        while !*stop.borrow() {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break;
            };
            match shared.queue.claim_jobs(&shared.worker_id, 1).await {
                Ok(mut jobs) => match jobs.pop() {
                    Some(job) => {
                        tracing::info!(job = %job.id, attempt = job.attempt, "claimed job");
                        let (shared, freed) = (shared.clone(), freed.clone());
                        slots.spawn(async move {
                            slot::run(shared.clone(), job).await;
                            drop(permit);
                            freed.notify_one();
                        });
                    }
                    None => break,
                },
                Err(e) => {
                    tracing::debug!(error = %e, "could not claim jobs");
                    break;
                }
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            notice = notices.recv(), if listening => match notice {
                Some(Notice::Control(id)) => {
                    if let Some(slot) = shared.running().get(&id) {
                        slot.poke.notify_one();
                    }
                }
                Some(Notice::Reconnected) => {
                    for slot in shared.running().values() {
                        slot.poke.notify_one();
                    }
                }
                Some(Notice::Queued(_)) => {}
                None => listening = false,
            },
            _ = tick.tick() => {}
            _ = freed.notified() => {}
            Some(_) = slots.join_next(), if !slots.is_empty() => {}
        }
    }
    shared
        .shutting_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    for control in shared.running().values() {
        control.stop.raise(StopReason::Shutdown);
    }
    let drained = tokio::time::timeout(settings.shutdown_grace, async {
        while slots.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "running jobs did not stop within the shutdown grace period; their leases will expire"
        );
    }
}
