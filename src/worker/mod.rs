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

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::artifacts::Artifacts;
use crate::queue::notify::{Notice, spawn_listener};
use crate::queue::{Queue, QueueConfig};
use crate::store::Store;

pub use engine::{
    JobContext, JobExecutor, JobFailure, JobOutcome, JobSpec, Level, Metrics, Progress, ResumeFrom,
    SlotDevice, StopReason,
};
pub(crate) use slot::model_key;
pub use training::{EngineExecutor, EstimateRequest, estimate};

/// How this process runs jobs.
#[derive(Clone)]
pub struct WorkerSettings {
    /// Training slots (jobs run at once by this process); 0 runs none.
    pub slots: usize,
    /// The devices the slots train on (`KILN_DEVICES`): slot i uses device i mod their
    /// number, so `KILN_WORKERS` equal to the number of GPUs gives one slot per GPU, and
    /// a multiple of it several jobs per GPU. Empty means the CPU.
    pub devices: Vec<SlotDevice>,
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
            devices: vec![SlotDevice::cpu()],
            executor: Some(Arc::new(EngineExecutor)),
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
            .field(
                "devices",
                &self.devices.iter().map(|d| d.spec).collect::<Vec<_>>(),
            )
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

/// The slots of this process: each one's device, which are free, and how much of each
/// device's memory the running jobs were said to need.
struct SlotTable {
    devices: Vec<SlotDevice>,
    busy: Vec<bool>,
    /// Bytes held on each device (by its `KILN_DEVICES` name) by running jobs.
    used: HashMap<crate::device::DeviceSpec, u64>,
}

impl SlotTable {
    /// Slot i trains on device i mod their number (the CPU when none are given).
    fn new(devices: &[SlotDevice], slots: usize) -> SlotTable {
        let devices: Vec<SlotDevice> = if devices.is_empty() {
            vec![SlotDevice::cpu(); slots]
        } else {
            (0..slots)
                .map(|i| devices[i % devices.len()].clone())
                .collect()
        };
        SlotTable {
            busy: vec![false; devices.len()],
            devices,
            used: HashMap::new(),
        }
    }

    /// Where a job could start now: for each device with a free slot, its lowest free slot
    /// and the device memory left there (`None`: no limit). Devices in slot order, so one
    /// job on a two-GPU machine lands on the first GPU and a second job on the other.
    fn candidates(&self) -> Vec<(usize, Option<i64>)> {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for (i, device) in self.devices.iter().enumerate() {
            if self.busy[i] || seen.contains(&device.spec) {
                continue;
            }
            seen.push(device.spec);
            let used = self.used.get(&device.spec).copied().unwrap_or(0);
            let free = device
                .memory_bytes
                .map(|cap| cap.saturating_sub(used).min(i64::MAX as u64) as i64);
            out.push((i, free));
        }
        out
    }

    fn occupy(&mut self, slot: usize, bytes: u64) {
        self.busy[slot] = true;
        *self.used.entry(self.devices[slot].spec).or_default() += bytes;
    }

    fn release(&mut self, slot: usize, bytes: u64) {
        self.busy[slot] = false;
        if let Some(used) = self.used.get_mut(&self.devices[slot].spec) {
            *used = used.saturating_sub(bytes);
        }
    }
}

fn lock(table: &Mutex<SlotTable>) -> std::sync::MutexGuard<'_, SlotTable> {
    table.lock().unwrap_or_else(|e| e.into_inner())
}

/// Claims one job for the first of `candidates` that has one fitting its free memory.
async fn claim_for_a_slot(
    shared: &Shared,
    candidates: Vec<(usize, Option<i64>)>,
) -> Result<Option<(usize, crate::queue::JobRow)>, crate::store::StoreError> {
    for (slot, free) in candidates {
        if let Some(job) = shared
            .queue
            .claim_jobs_fitting(&shared.worker_id, 1, free)
            .await?
            .pop()
        {
            return Ok(Some((slot, job)));
        }
    }
    Ok(None)
}

async fn dispatch(
    shared: Arc<Shared>,
    settings: WorkerSettings,
    mut notices: mpsc::Receiver<Notice>,
    mut stop: watch::Receiver<bool>,
) {
    let table = Arc::new(Mutex::new(SlotTable::new(
        &settings.devices,
        settings.slots,
    )));
    let freed = Arc::new(Notify::new());
    let mut slots = JoinSet::new();
    let mut tick = tokio::time::interval(settings.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut listening = true;
    loop {
        // Claim while there are free slots and claimable jobs that fit.
        while !*stop.borrow() {
            let candidates = lock(&table).candidates();
            if candidates.is_empty() {
                break;
            }
            match claim_for_a_slot(&shared, candidates).await {
                Ok(Some((slot, job))) => {
                    let bytes = job.device_memory_bytes.unwrap_or(0).max(0) as u64;
                    let device = {
                        let mut t = lock(&table);
                        t.occupy(slot, bytes);
                        t.devices[slot].clone()
                    };
                    tracing::info!(job = %job.id, attempt = job.attempt, device = %device.spec, "claimed job");
                    let (shared, freed, table) = (shared.clone(), freed.clone(), table.clone());
                    slots.spawn(async move {
                        slot::run(shared.clone(), job, device).await;
                        lock(&table).release(slot, bytes);
                        freed.notify_one();
                    });
                }
                Ok(None) => break,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceSpec;

    fn labelled(spec: DeviceSpec, memory_bytes: Option<u64>) -> SlotDevice {
        // Only the labels and sizes matter to the assignment; the CPU stands in for the GPUs.
        SlotDevice {
            spec,
            device: candle_core::Device::Cpu,
            memory_bytes,
        }
    }

    #[test]
    fn slots_spread_over_the_devices_and_claims_go_where_memory_is_free() {
        let gb = 1_000_000_000u64;
        let gpus = [
            labelled(DeviceSpec::Cuda(0), Some(80 * gb)),
            labelled(DeviceSpec::Cuda(1), Some(40 * gb)),
        ];
        let mut t = SlotTable::new(&gpus, 4);
        let specs: Vec<DeviceSpec> = t.devices.iter().map(|d| d.spec).collect();
        assert_eq!(specs, [0, 1, 0, 1].map(DeviceSpec::Cuda));
        // One candidate per device, lowest slot first, with the whole memory free.
        assert_eq!(
            t.candidates(),
            [(0, Some(80e9 as i64)), (1, Some(40e9 as i64))]
        );
        // A 50 GB job on GPU 0 leaves 30 GB there; GPU 0's next slot is slot 2.
        t.occupy(0, 50 * gb);
        assert_eq!(
            t.candidates(),
            [(1, Some(40e9 as i64)), (2, Some(30e9 as i64))]
        );
        t.occupy(1, 40 * gb);
        assert_eq!(t.candidates(), [(2, Some(30e9 as i64)), (3, Some(0))]);
        t.occupy(2, 30 * gb);
        t.occupy(3, 0);
        assert!(t.candidates().is_empty(), "every slot is busy");
        t.release(0, 50 * gb);
        assert_eq!(t.candidates(), [(0, Some(50e9 as i64))]);

        // Without a memory limit (the CPU by default) any job fits; no devices means the CPU.
        let cpu = SlotTable::new(&[], 2);
        assert_eq!(cpu.candidates(), [(0, None)]);
        assert_eq!(cpu.devices.len(), 2);
    }
}
