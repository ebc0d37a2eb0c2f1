//! The inference engine: a cache of loaded models bounded by memory (least recently used
//! evicted), batching threads per loaded model (one lane per core, see [`Lanes`]), a fixed
//! number of inference slots shared by all models, a bound on waiting requests and a
//! per-request deadline.
//!
//! The HTTP layer hands it a [`ModelRef`] (where the model's files are) and plain strings;
//! tokenisation runs on tokio's blocking pool, the forward passes on the model's lanes
//! (never on a tokio worker thread), TEI-style: a lane takes the requests that arrived while
//! it was busy, sorts the inputs by length and runs them in batches bounded by padded tokens.

pub mod generate;
pub mod model;
pub mod vision;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::{OnceCell, oneshot};

use crate::artifacts::Artifacts;
use crate::data::text::EncodedText;
pub use generate::{FinishReason, GenEvent, GenerativeModel, Prompt, SamplingParams};
pub use model::{Classification, EncoderModel, Implementation, Pooling, Purpose, TokenizeError};
pub use vision::{ImageModel, LoadedImageModel};

/// What the engine may use. Serving and training share a machine: these bound serving's
/// share (training's is `KILN_WORKERS`).
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// Bytes of model weights kept loaded (`KILN_SERVE_MEMORY`).
    pub memory_bytes: u64,
    /// Models computing at once (a text model's lanes share one slot)
    /// (`KILN_SERVE_SLOTS`).
    pub slots: usize,
    /// Requests admitted but not answered, across all models; past it: 429
    /// (`KILN_SERVE_MAX_WAITING`).
    pub max_waiting: usize,
    /// Time from admission to answer (`KILN_SERVE_TIMEOUT_SECS`).
    pub timeout: Duration,
    /// Padded tokens in one forward pass (`KILN_SERVE_BATCH_TOKENS`).
    pub max_batch_tokens: usize,
    /// Inputs in one request (`KILN_SERVE_MAX_INPUTS`).
    pub max_inputs: usize,
    pub implementation: Implementation,
    pub device: candle_core::Device,
    /// Lanes per text model, and parts of a batch run on every core; 0: one per core
    /// (`KILN_SERVE_THREADS`).
    pub threads: usize,
}

impl ServeSettings {
    /// Parts of a batch computed side by side: one per core on the CPU (`KILN_SERVE_THREADS`
    /// overrides); a GPU takes each batch whole, since parts would only queue on its stream.
    fn batch_threads(&self) -> usize {
        if !self.device.is_cpu() {
            1
        } else if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

impl Default for ServeSettings {
    fn default() -> Self {
        ServeSettings {
            memory_bytes: 4 << 30,
            slots: 1,
            max_waiting: 512,
            timeout: Duration::from_secs(30),
            max_batch_tokens: 16_384,
            max_inputs: 2048,
            implementation: Implementation::Auto,
            device: candle_core::Device::Cpu,
            threads: 0,
        }
    }
}

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    /// A directory on this machine (base models).
    Dir(PathBuf),
    /// A directory in the artifact store (fine-tuned models and checkpoints), fetched once.
    Stored(String),
}

/// A model the API resolved: its public id and its files.
#[derive(Debug, Clone)]
pub struct ModelRef {
    pub id: String,
    pub location: ModelLocation,
}

/// Why a request was not answered.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model cannot do what was asked (not an encoder, no classification head, ...).
    #[error("{0}")]
    Unsupported(String),
    /// An input is unusable; `index` says which.
    #[error("input[{index}]: {message}")]
    BadInput { index: usize, message: String },
    /// Too many requests are waiting.
    #[error("the inference queue is full ({0} requests waiting); retry shortly")]
    Overloaded(usize),
    /// The request did not finish within the deadline.
    #[error("the request did not finish within {0:?}")]
    Timeout(Duration),
    /// The model cannot be loaded within the memory budget.
    #[error("{0}")]
    TooLarge(String),
    /// The model files are missing or broken.
    #[error("{0}")]
    Load(String),
    /// The model was deleted while the request was on its way.
    #[error("model '{0}' was deleted")]
    Deleted(String),
    /// A failure while running the model.
    #[error("{0}")]
    Internal(String),
}

/// The engine's handle; cheap to clone.
#[derive(Clone)]
pub struct Serving {
    inner: Arc<Inner>,
}

struct Inner {
    settings: ServeSettings,
    artifacts: Artifacts,
    cache: Mutex<HashMap<String, Arc<CacheEntry>>>,
    /// Models deleted while this process ran: never loaded again (ids are not reused).
    retired: Mutex<std::collections::HashSet<String>>,
    slots: Arc<Slots>,
    waiting: AtomicUsize,
    clock: AtomicU64,
}

struct CacheEntry {
    cell: OnceCell<Loaded>,
    /// Logical time of the last use (for LRU).
    last_used: AtomicU64,
    /// Requests using the model now (loading it, waiting for or running a pass).
    in_use: AtomicUsize,
    /// Woken when `in_use` drops to zero.
    idle: tokio::sync::Notify,
}

/// Counts a request as using a cache entry until dropped (see [`Serving::retire`]).
struct InUse(Arc<CacheEntry>);

impl InUse {
    fn new(entry: Arc<CacheEntry>) -> InUse {
        entry.in_use.fetch_add(1, Ordering::SeqCst);
        InUse(entry)
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        if self.0.in_use.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A loaded model of either kind.
#[derive(Clone)]
enum Loaded {
    Encoder(Arc<LoadedModel>),
    Generator(Arc<LoadedGenerator>),
    Image(Arc<LoadedImageModel>),
}

impl Loaded {
    fn bytes(&self) -> u64 {
        match self {
            Loaded::Encoder(m) => m.bytes,
            Loaded::Generator(m) => m.bytes,
            Loaded::Image(m) => m.bytes,
        }
    }
}

/// A decoder with its generation thread. Dropping the last handle ends the thread.
pub struct LoadedGenerator {
    pub model: Arc<GenerativeModel>,
    pub bytes: u64,
    queue: mpsc::Sender<GenWork>,
}

/// What one generation request receives: its events in order, or the error that ended it.
pub type GenReceiver = tokio::sync::mpsc::UnboundedReceiver<Result<GenEvent, ServeError>>;

/// A started generation.
pub struct Generation {
    pub model: Arc<LoadedGenerator>,
    pub prompt_tokens: usize,
    pub events: GenReceiver,
}

struct GenWork {
    prompt: Vec<u32>,
    params: SamplingParams,
    events: tokio::sync::mpsc::UnboundedSender<Result<GenEvent, ServeError>>,
    deadline: Instant,
    timeout: Duration,
    /// Counts the request as waiting until it is finished.
    _admission: OwnedAdmission,
    /// Keeps the model's files from being deleted under the request.
    _in_use: InUse,
}

/// Counts a request as waiting until dropped, movable across threads.
struct OwnedAdmission(Arc<Inner>);

impl Drop for OwnedAdmission {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A model with its inference lanes. Dropping the last handle closes its queue: the lanes
/// answer what is queued and end.
pub struct LoadedModel {
    pub model: Arc<EncoderModel>,
    pub bytes: u64,
    queue: Arc<Lanes>,
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// What the model computed for one input.
enum Output {
    Classify(Classification),
    Embed(Vec<f32>),
}

type Reply = oneshot::Sender<Result<Vec<Output>, ServeError>>;

struct Work {
    inputs: Vec<EncodedText>,
    purpose: Purpose,
    reply: Reply,
    deadline: Instant,
    timeout: Duration,
}

/// A counting semaphore for OS threads.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn acquire(&self) -> SlotGuard<'_> {
        self.take();
        SlotGuard(self)
    }

    fn take(&self) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
    }

    fn give(&self) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        *free += 1;
        self.freed.notify_one();
    }
}

struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0.give();
    }
}

/// Counts a request as waiting until dropped.
struct Admission<'a>(&'a AtomicUsize);

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Serving {
    pub fn new(settings: ServeSettings, artifacts: Artifacts) -> Serving {
        let slots = settings.slots.max(1);
        Serving {
            inner: Arc::new(Inner {
                settings,
                artifacts,
                cache: Mutex::new(HashMap::new()),
                retired: Mutex::new(std::collections::HashSet::new()),
                slots: Arc::new(Slots {
                    free: Mutex::new(slots),
                    freed: Condvar::new(),
                }),
                waiting: AtomicUsize::new(0),
                clock: AtomicU64::new(0),
            }),
        }
    }

    pub fn settings(&self) -> &ServeSettings {
        &self.inner.settings
    }

    /// Label probabilities for each text, with the token count of each.
    pub async fn classify(
        &self,
        model: &ModelRef,
        texts: Vec<String>,
        truncate: bool,
    ) -> Result<(Arc<LoadedModel>, Vec<(Classification, usize)>), ServeError> {
        let (loaded, out) = self.run(model, texts, truncate, Purpose::Classify).await?;
        let out = out
            .into_iter()
            .filter_map(|(o, n)| match o {
                Output::Classify(c) => Some((c, n)),
                Output::Embed(_) => None,
            })
            .collect();
        Ok((loaded, out))
    }

    /// Sentence embeddings for each text, with the token count of each.
    pub async fn embed(
        &self,
        model: &ModelRef,
        texts: Vec<String>,
        truncate: bool,
    ) -> Result<(Arc<LoadedModel>, Vec<(Vec<f32>, usize)>), ServeError> {
        let (loaded, out) = self.run(model, texts, truncate, Purpose::Embed).await?;
        let out = out
            .into_iter()
            .filter_map(|(o, n)| match o {
                Output::Embed(e) => Some((e, n)),
                Output::Classify(_) => None,
            })
            .collect();
        Ok((loaded, out))
    }

    /// Admits the request, loads the model, tokenises and waits for the model thread.
    async fn run(
        &self,
        model: &ModelRef,
        texts: Vec<String>,
        truncate: bool,
        purpose: Purpose,
    ) -> Result<(Arc<LoadedModel>, Vec<(Output, usize)>), ServeError> {
        let _admitted = self.admit()?;
        let timeout = self.inner.settings.timeout;
        let deadline = Instant::now() + timeout;
        let (loaded, _in_use) = self.get(model).await?;
        let loaded = match loaded {
            Loaded::Encoder(m) => m,
            Loaded::Generator(_) => {
                return Err(ServeError::Unsupported(format!(
                    "model '{}' is a generative model (a decoder): use /v1/chat/completions or /v1/completions",
                    model.id
                )));
            }
            Loaded::Image(_) => {
                return Err(ServeError::Unsupported(format!(
                    "model '{}' is an image classifier: use /v1/images/classifications",
                    model.id
                )));
            }
        };
        if purpose == Purpose::Classify && !loaded.model.is_classifier() {
            return Err(ServeError::Unsupported(format!(
                "model '{}' has no classification head; use /v1/embeddings, or fine-tune it on labelled text first",
                model.id
            )));
        }
        let inputs = tokenize(&loaded, texts, purpose, truncate).await?;
        let lengths: Vec<usize> = inputs.iter().map(|r| r.ids.len()).collect();
        let (reply, rx) = oneshot::channel();
        loaded
            .queue
            .push(Work {
                inputs,
                purpose,
                reply,
                deadline,
                timeout,
            })
            .map_err(|_| ServeError::Internal("the model's inference lanes have stopped".into()))?;
        let out = wait(rx, deadline, timeout).await?;
        Ok((loaded, out.into_iter().zip(lengths).collect()))
    }

    /// Retires a deleted model: it leaves the cache, is never loaded again by this process,
    /// and the requests already using it (loading it, queued for or in a forward pass, or
    /// generating) are waited for, up to `within`, so that its files can be removed without
    /// failing them. Returns whether they all finished in time.
    pub async fn retire(&self, id: &str, within: Duration) -> bool {
        let entry = {
            let mut cache = self.lock_cache();
            self.inner
                .retired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_owned());
            cache.remove(id)
        };
        let Some(entry) = entry else {
            return true;
        };
        let drained = async {
            loop {
                let idle = entry.idle.notified();
                if entry.in_use.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(within, drained).await.is_ok()
    }

    fn is_retired(&self, id: &str) -> bool {
        self.inner
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Whether `id` is loaded (or loading) now.
    pub fn is_loaded(&self, id: &str) -> bool {
        self.lock_cache().contains_key(id)
    }

    /// The ids of the models loaded now.
    pub fn loaded(&self) -> Vec<String> {
        self.lock_cache()
            .iter()
            .filter(|(_, entry)| entry.cell.get().is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<CacheEntry>>> {
        self.inner.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit(&self) -> Result<Admission<'_>, ServeError> {
        let max = self.inner.settings.max_waiting;
        let now = self.inner.waiting.fetch_add(1, Ordering::SeqCst);
        let admission = Admission(&self.inner.waiting);
        if now >= max {
            metrics::counter!("kiln_serve_rejected_total").increment(1);
            return Err(ServeError::Overloaded(now));
        }
        Ok(admission)
    }

    /// The loaded model, loading it (once, however many requests ask at the same time) and
    /// evicting the least recently used others past the memory budget.
    async fn get(&self, model: &ModelRef) -> Result<(Loaded, InUse), ServeError> {
        let in_use = {
            let mut cache = self.lock_cache();
            // Checked under the cache lock, which `retire` holds while it retires a model.
            if self.is_retired(&model.id) {
                return Err(ServeError::Deleted(model.id.clone()));
            }
            let entry = cache
                .entry(model.id.clone())
                .or_insert_with(|| {
                    Arc::new(CacheEntry {
                        cell: OnceCell::new(),
                        last_used: AtomicU64::new(0),
                        in_use: AtomicUsize::new(0),
                        idle: tokio::sync::Notify::new(),
                    })
                })
                .clone();
            // Counted while the cache lock is held, so `retire` cannot miss it.
            InUse::new(entry)
        };
        let entry = in_use.0.clone();
        entry.last_used.store(
            self.inner.clock.fetch_add(1, Ordering::Relaxed) + 1,
            Ordering::Relaxed,
        );
        let result = entry
            .cell
            .get_or_try_init(|| self.load(model))
            .await
            .cloned();
        match result {
            Ok(loaded) => Ok((loaded, in_use)),
            Err(e) => {
                // Do not keep a failed entry: a later request tries again.
                let mut cache = self.lock_cache();
                if cache
                    .get(&model.id)
                    .is_some_and(|current| Arc::ptr_eq(current, &entry))
                {
                    cache.remove(&model.id);
                }
                Err(e)
            }
        }
    }

    async fn load(&self, model: &ModelRef) -> Result<Loaded, ServeError> {
        let dir = match &model.location {
            ModelLocation::Dir(dir) => dir.clone(),
            ModelLocation::Stored(key) => {
                self.inner.artifacts.local_dir(key).await.map_err(|e| {
                    ServeError::Load(format!(
                        "the files of model '{}' are unavailable: {e}",
                        model.id
                    ))
                })?
            }
        };
        let budget = self.inner.settings.memory_bytes;
        let bytes = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || model::weight_bytes(&dir))
                .await
                .map_err(|e| ServeError::Internal(e.to_string()))?
                .map_err(|e| ServeError::Load(format!("model '{}': {e}", model.id)))?
        };
        if bytes > budget {
            return Err(ServeError::TooLarge(format!(
                "model '{}' needs {} MiB of memory, more than the serving budget of {} MiB (KILN_SERVE_MEMORY)",
                model.id,
                bytes >> 20,
                budget >> 20
            )));
        }
        self.make_room(&model.id, bytes);
        if crate::train::is_decoder_dir(&dir) {
            return self.load_generator(model, dir, bytes).await;
        }
        if crate::nn::vision::vision_family(&dir).is_some() {
            return self.load_image(model, dir, bytes).await;
        }
        let started = Instant::now();
        let settings = self.inner.settings.clone();
        let id = model.id.clone();
        let encoder = tokio::task::spawn_blocking(move || {
            EncoderModel::load(&dir, &settings.device, settings.implementation)
        })
        .await
        .map_err(|e| ServeError::Internal(e.to_string()))?
        .map_err(|e| match e {
            model::ModelError::Unsupported(m) => {
                ServeError::Unsupported(format!("model '{id}': {m}"))
            }
            other => ServeError::Load(format!("model '{id}' could not be loaded: {other}")),
        })?;
        let encoder = Arc::new(encoder);
        let threads = self.inner.settings.batch_threads();
        let lanes = Arc::new(Lanes::new(self.inner.slots.clone(), threads));
        let max_batch_tokens = self.inner.settings.max_batch_tokens.max(1);
        // One lane per core; they share the part pools (one thread each), so a lane's passes
        // stay on its core and a batch run across all cores uses them all.
        let pools = if threads > 1 {
            part_pools(threads)
        } else {
            None
        };
        for lane in 0..threads {
            let (queue, model_ref, id) = (lanes.clone(), encoder.clone(), model.id.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("kiln-serve-{}-{lane}", short(&model.id)))
                .spawn(move || run_lane(&id, lane, &model_ref, &queue, pools, max_batch_tokens));
            if let Err(e) = spawned {
                lanes.close();
                return Err(ServeError::Internal(format!(
                    "could not start an inference thread: {e}"
                )));
            }
        }
        tracing::info!(model = %model.id, mib = bytes >> 20, implementation = ?encoder.implementation,
            seconds = started.elapsed().as_secs_f64(), "model loaded for serving");
        metrics::counter!("kiln_serve_model_loads_total").increment(1);
        Ok(Loaded::Encoder(Arc::new(LoadedModel {
            model: encoder,
            bytes,
            queue: lanes,
        })))
    }

    async fn load_generator(
        &self,
        model: &ModelRef,
        dir: PathBuf,
        bytes: u64,
    ) -> Result<Loaded, ServeError> {
        let started = Instant::now();
        let device = self.inner.settings.device.clone();
        let id = model.id.clone();
        let generator = tokio::task::spawn_blocking(move || GenerativeModel::load(&dir, &device))
            .await
            .map_err(|e| ServeError::Internal(e.to_string()))?
            .map_err(|e| ServeError::Load(format!("model '{id}' could not be loaded: {e}")))?;
        let generator = Arc::new(generator);
        let (tx, rx) = mpsc::channel();
        let thread_model = generator.clone();
        let slots = self.inner.slots.clone();
        std::thread::Builder::new()
            .name(format!("kiln-gen-{}", short(&model.id)))
            .spawn(move || run_generator(thread_model, rx, slots))
            .map_err(|e| {
                ServeError::Internal(format!("could not start a generation thread: {e}"))
            })?;
        tracing::info!(model = %model.id, mib = bytes >> 20,
            seconds = started.elapsed().as_secs_f64(), "generative model loaded for serving");
        metrics::counter!("kiln_serve_model_loads_total").increment(1);
        Ok(Loaded::Generator(Arc::new(LoadedGenerator {
            model: generator,
            bytes,
            queue: tx,
        })))
    }

    async fn load_image(
        &self,
        model: &ModelRef,
        dir: PathBuf,
        bytes: u64,
    ) -> Result<Loaded, ServeError> {
        let started = Instant::now();
        let device = self.inner.settings.device.clone();
        let id = model.id.clone();
        let loaded = tokio::task::spawn_blocking(move || ImageModel::load(&dir, &device))
            .await
            .map_err(|e| ServeError::Internal(e.to_string()))?
            .map_err(|e| ServeError::Load(format!("model '{id}' could not be loaded: {e}")))?;
        // The weights' inference forms take memory beside the weights: room for them too.
        let bytes = bytes + loaded.prepared_bytes;
        self.make_room(&model.id, bytes);
        let loaded = Arc::new(loaded);
        let (tx, rx) = mpsc::channel();
        let thread_model = loaded.clone();
        let slots = self.inner.slots.clone();
        std::thread::Builder::new()
            .name(format!("kiln-img-{}", short(&model.id)))
            .spawn(move || vision::run_image_model(thread_model, rx, slots))
            .map_err(|e| {
                ServeError::Internal(format!("could not start an inference thread: {e}"))
            })?;
        tracing::info!(model = %model.id, mib = bytes >> 20,
            seconds = started.elapsed().as_secs_f64(), "image model loaded for serving");
        metrics::counter!("kiln_serve_model_loads_total").increment(1);
        Ok(Loaded::Image(Arc::new(LoadedImageModel {
            model: loaded,
            bytes,
            queue: tx,
        })))
    }

    /// Class probabilities for each image (encoded PNG, JPEG or WebP bytes).
    pub async fn classify_images(
        &self,
        model: &ModelRef,
        images: Vec<Vec<u8>>,
    ) -> Result<(Arc<LoadedImageModel>, Vec<Vec<f32>>), ServeError> {
        let _admitted = self.admit()?;
        let timeout = self.inner.settings.timeout;
        let deadline = Instant::now() + timeout;
        let (loaded, _in_use) = self.get(model).await?;
        let loaded = match loaded {
            Loaded::Image(m) => m,
            Loaded::Encoder(_) => {
                return Err(ServeError::Unsupported(format!(
                    "model '{}' is a text model: use /v1/classifications",
                    model.id
                )));
            }
            Loaded::Generator(_) => {
                return Err(ServeError::Unsupported(format!(
                    "model '{}' is a generative model (a decoder): use /v1/chat/completions",
                    model.id
                )));
            }
        };
        let n = images.len();
        let prep = loaded.model.clone();
        let pixels = tokio::task::spawn_blocking(move || {
            let mut all = Vec::with_capacity(n * prep.preprocess.pixels_per_image());
            for (index, bytes) in images.iter().enumerate() {
                let px = prep
                    .prepare(bytes)
                    .map_err(|message| ServeError::BadInput { index, message })?;
                all.extend_from_slice(&px);
            }
            Ok::<_, ServeError>(all)
        })
        .await
        .map_err(|e| ServeError::Internal(e.to_string()))??;
        let (reply, rx) = oneshot::channel();
        loaded
            .queue
            .send(vision::ImageWork {
                pixels,
                n,
                reply,
                deadline,
                timeout,
            })
            .map_err(|_| ServeError::Internal("the model's inference thread has stopped".into()))?;
        let out = wait(rx, deadline, timeout).await?;
        Ok((loaded, out))
    }

    /// Starts generating from `prompt`; the events arrive on the returned receiver. The
    /// request counts as waiting (for `KILN_SERVE_MAX_WAITING`) until it is finished, and
    /// generation stops early when the receiver is dropped (the client went away).
    pub async fn generate(
        &self,
        model: &ModelRef,
        prompt: Prompt,
        params: SamplingParams,
    ) -> Result<Generation, ServeError> {
        let max = self.inner.settings.max_waiting;
        let now = self.inner.waiting.fetch_add(1, Ordering::SeqCst);
        let admission = OwnedAdmission(self.inner.clone());
        if now >= max {
            metrics::counter!("kiln_serve_rejected_total").increment(1);
            return Err(ServeError::Overloaded(now));
        }
        let timeout = self.inner.settings.timeout;
        let deadline = Instant::now() + timeout;
        let (loaded, in_use) = self.get(model).await?;
        let loaded = match loaded {
            Loaded::Generator(m) => m,
            Loaded::Encoder(_) => {
                return Err(ServeError::Unsupported(format!(
                    "model '{}' is a text encoder, which does not generate text: use /v1/classifications or /v1/embeddings",
                    model.id
                )));
            }
            Loaded::Image(_) => {
                return Err(ServeError::Unsupported(format!(
                    "model '{}' is an image classifier, which does not generate text: use /v1/images/classifications",
                    model.id
                )));
            }
        };
        let encoder = loaded.model.clone();
        let ids = tokio::task::spawn_blocking(move || encoder.encode(&prompt))
            .await
            .map_err(|e| ServeError::Internal(e.to_string()))?
            .map_err(|message| ServeError::BadInput { index: 0, message })?;
        if ids.len() >= loaded.model.max_positions() {
            return Err(ServeError::BadInput {
                index: 0,
                message: format!(
                    "the prompt is {} tokens long; this model's context is {} tokens",
                    ids.len(),
                    loaded.model.max_positions()
                ),
            });
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let prompt_tokens = ids.len();
        loaded
            .queue
            .send(GenWork {
                prompt: ids,
                params,
                events: tx,
                deadline,
                timeout,
                _admission: admission,
                _in_use: in_use,
            })
            .map_err(|_| {
                ServeError::Internal("the model's generation thread has stopped".into())
            })?;
        Ok(Generation {
            model: loaded,
            prompt_tokens,
            events: rx,
        })
    }

    /// Evicts least recently used models until `bytes` more fit in the budget.
    fn make_room(&self, loading: &str, bytes: u64) {
        let budget = self.inner.settings.memory_bytes;
        let mut cache = self.lock_cache();
        loop {
            let used: u64 = cache
                .iter()
                .filter(|(id, _)| id.as_str() != loading)
                .filter_map(|(_, e)| e.cell.get().map(Loaded::bytes))
                .sum();
            if used + bytes <= budget {
                return;
            }
            let victim = cache
                .iter()
                .filter(|(id, e)| id.as_str() != loading && e.cell.get().is_some())
                .min_by_key(|(_, e)| e.last_used.load(Ordering::Relaxed))
                .map(|(id, _)| id.clone());
            match victim {
                Some(id) => {
                    tracing::info!(model = %id, "evicting model from the serving cache");
                    metrics::counter!("kiln_serve_model_evictions_total").increment(1);
                    cache.remove(&id);
                }
                None => return,
            }
        }
    }
}

fn short(id: &str) -> String {
    id.rsplit([':', '/'])
        .next()
        .unwrap_or(id)
        .chars()
        .take(12)
        .collect()
}

async fn tokenize(
    loaded: &Arc<LoadedModel>,
    texts: Vec<String>,
    purpose: Purpose,
    truncate: bool,
) -> Result<Vec<EncodedText>, ServeError> {
    let model = loaded.model.clone();
    tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .enumerate()
            .map(|(index, text)| {
                model
                    .tokenize(text, purpose, truncate)
                    .map_err(|e| ServeError::BadInput {
                        index,
                        message: match e {
                            TokenizeError::TooLong { tokens, max } => format!(
                                "the input is {tokens} tokens long, more than this model's limit of {max}; shorten it or send \"truncate\": true"
                            ),
                            other => other.to_string(),
                        },
                    })
            })
            .collect()
    })
    .await
    .map_err(|e| ServeError::Internal(e.to_string()))?
}

async fn wait<T>(
    rx: oneshot::Receiver<Result<T, ServeError>>,
    deadline: Instant,
    timeout: Duration,
) -> Result<T, ServeError> {
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(ServeError::Internal(
            "the inference thread dropped the request".into(),
        )),
        Err(_) => {
            metrics::counter!("kiln_serve_timeouts_total").increment(1);
            Err(ServeError::Timeout(timeout))
        }
    }
}

/// Samples (rows) decoded together at most.
const MAX_GENERATION_ROWS: usize = 32;

/// A generative model's thread: takes every request waiting, decodes them as one batch
/// (their `n` samples all rows of it) while holding an inference slot, and answers each
/// through its own channel. Requests that arrive meanwhile form the next batch; one is only
/// batched with others when that leaves its room for new tokens unchanged.
fn run_generator(model: Arc<GenerativeModel>, rx: mpsc::Receiver<GenWork>, slots: Arc<Slots>) {
    let mut pending: std::collections::VecDeque<GenWork> = std::collections::VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(work) => pending.push_back(work),
                Err(_) => break,
            }
        }
        while let Ok(work) = rx.try_recv() {
            pending.push_back(work);
        }
        let now = Instant::now();
        pending.retain(|w| {
            if w.events.is_closed() {
                return false;
            }
            if w.deadline <= now {
                let _ = w.events.send(Err(ServeError::Timeout(w.timeout)));
                return false;
            }
            true
        });
        let mut batch: Vec<GenWork> = Vec::new();
        let (mut longest, mut rows) = (0usize, 0usize);
        let mut later = std::collections::VecDeque::new();
        while let Some(work) = pending.pop_front() {
            let padded = longest.max(work.prompt.len());
            let keeps_room = batch.iter().chain(std::iter::once(&work)).all(|w| {
                model.budget(padded, w.params.max_tokens)
                    == model.budget(w.prompt.len(), w.params.max_tokens)
            });
            if batch.is_empty() || (keeps_room && rows + work.params.n <= MAX_GENERATION_ROWS) {
                longest = padded;
                rows += work.params.n;
                batch.push(work);
            } else {
                later.push_back(work);
            }
        }
        pending = later;
        if batch.is_empty() {
            continue;
        }
        let _slot = slots.acquire();
        let started = Instant::now();
        let mut emits: Vec<Box<dyn FnMut(GenEvent) -> bool>> = batch
            .iter()
            .map(|w| {
                let events = w.events.clone();
                Box::new(move |e| events.send(Ok(e)).is_ok()) as Box<dyn FnMut(GenEvent) -> bool>
            })
            .collect();
        let mut requests: Vec<generate::GenRequest<'_>> = batch
            .iter()
            .zip(emits.iter_mut())
            .map(|(w, emit)| generate::GenRequest {
                prompt: &w.prompt,
                params: &w.params,
                emit: emit.as_mut(),
            })
            .collect();
        let results = model.generate_batch(&mut requests);
        drop(requests);
        for (work, result) in batch.iter().zip(results) {
            if let Err(e) = result {
                let _ = work.events.send(Err(match e {
                    generate::GenerateError::Input(message) => {
                        ServeError::BadInput { index: 0, message }
                    }
                    generate::GenerateError::Internal(m) => ServeError::Internal(m),
                }));
            }
        }
        metrics::histogram!("kiln_serve_generation_batch_rows").record(rows as f64);
        metrics::histogram!("kiln_serve_generation_seconds")
            .record(started.elapsed().as_secs_f64());
    }
    tracing::debug!("generation thread stopped (model unloaded)");
}

/// How long a model thread waits for the clients of its previous batch to send again: an
/// eighth of the time the previous batch took, within these bounds (a quarter filled the
/// batches at 8 clients but left the late ones a whole batch behind: p99 over 2× p50). While a batch computes,
/// the requests of the clients it answered last are still being read and tokenised on the
/// same cores, so they arrive late; waiting a fraction of the compute time for them costs
/// little latency and keeps batches full.
const BATCH_WAIT_MIN: Duration = Duration::from_millis(1);
const BATCH_WAIT_MAX: Duration = Duration::from_millis(8);

fn batch_wait(previous_batch: Duration) -> Duration {
    (previous_batch / 8).clamp(BATCH_WAIT_MIN, BATCH_WAIT_MAX)
}

/// One input of a batch, and where its answer goes.
struct Item<'a> {
    work: usize,
    index: usize,
    row: &'a EncodedText,
}

/// A model's queue and the lanes that serve it: one lane (an OS thread) per serving core.
///
/// A lane collects a batch from the queue, then computes it on its own core (its one-thread
/// part pool) while the next lane collects the requests that arrive meanwhile. So a core that
/// finishes early starts on new requests at once instead of waiting for the rest of a batch,
/// and requests arriving during a pass wait only for the next free core, not for the whole
/// batch. When the other lanes are idle and the batch would leave them nothing to do (a lone
/// request, or one large request), the lane keeps the collector's place and runs the batch
/// across every core, parts side by side, as one batching thread would.
///
/// The model holds one inference slot (`KILN_SERVE_SLOTS`) while any of its lanes computes, so
/// the slots still bound how many models compute at once.
struct Lanes {
    queue: Mutex<LaneQueue>,
    arrived: Condvar,
    /// Held by the lane collecting the next batch, and by a lane running one on every core.
    collector: Mutex<()>,
    /// Lanes not computing (waiting to collect, or collecting).
    idle: AtomicUsize,
    /// Lanes computing; the model holds a slot while there are any.
    busy: Mutex<usize>,
    slots: Arc<Slots>,
    count: usize,
}

#[derive(Default)]
struct LaneQueue {
    works: std::collections::VecDeque<Work>,
    closed: bool,
}

/// What a lane collected.
struct Collected {
    works: Vec<Work>,
    /// The other lanes are idle and nothing is left for them: run on every core.
    wide: bool,
}

impl Lanes {
    fn new(slots: Arc<Slots>, count: usize) -> Lanes {
        Lanes {
            queue: Mutex::new(LaneQueue::default()),
            arrived: Condvar::new(),
            collector: Mutex::new(()),
            idle: AtomicUsize::new(0),
            busy: Mutex::new(0),
            slots,
            count: count.max(1),
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, LaneQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a request; gives it back if the model is unloaded.
    fn push(&self, work: Work) -> Result<(), Work> {
        let mut queue = self.lock_queue();
        if queue.closed {
            return Err(work);
        }
        queue.works.push_back(work);
        drop(queue);
        self.arrived.notify_one();
        Ok(())
    }

    /// No more requests: the lanes answer what is queued and end.
    fn close(&self) {
        self.lock_queue().closed = true;
        self.arrived.notify_all();
    }

    /// Waits for requests (None once closed and drained), then for the clients of this lane's
    /// previous batch (`previous` of them, up to `batch_wait(previous_took)`), and takes this
    /// lane's share: everything when the other lanes are busy, else an even part.
    fn collect(&self, previous: usize, previous_took: Duration) -> Option<Collected> {
        let mut queue = self.lock_queue();
        while queue.works.is_empty() {
            if queue.closed {
                return None;
            }
            queue = self.arrived.wait(queue).unwrap_or_else(|p| p.into_inner());
        }
        let until = Instant::now() + batch_wait(previous_took);
        while queue.works.len() < previous && !queue.closed {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            queue = self
                .arrived
                .wait_timeout(queue, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        // This lane is counted idle too; the others are waiting for the collector's place.
        let others = self.idle.load(Ordering::SeqCst).saturating_sub(1);
        let queued = queue.works.len();
        let take = queued.div_ceil(others.min(self.count - 1) + 1);
        let works: Vec<Work> = queue.works.drain(..take).collect();
        let wide = others > 0 && take == queued && self.count > 1;
        if !queue.works.is_empty() {
            self.arrived.notify_one();
        }
        Some(Collected { works, wide })
    }

    fn start(&self) {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if *busy == 0 {
            self.slots.take();
        }
        *busy += 1;
    }

    fn finish(&self) {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        *busy -= 1;
        if *busy == 0 {
            self.slots.give();
        }
    }
}

/// Where a batch runs.
#[derive(Clone, Copy)]
enum Cores<'a> {
    /// On every serving core: each batch cut into `parts` run side by side, each part on its
    /// own one-thread pool (or, a lone part, on the global pool whose products use every core).
    All {
        parts: usize,
        pools: Option<&'a [rayon::ThreadPool]>,
    },
    /// On one lane's core (its one-thread pool; the calling thread's pool when there is none).
    One(Option<&'a rayon::ThreadPool>),
}

/// One lane of a model: collects batches and runs them (see [`Lanes`]).
fn run_lane(
    id: &str,
    lane: usize,
    model: &EncoderModel,
    lanes: &Lanes,
    pools: Option<&'static [rayon::ThreadPool]>,
    max_batch_tokens: usize,
) {
    // Requests in the previous batch: when as many clients are active, the ones whose answers
    // just went out are about to send again. Waiting a moment for them (`batch_wait`) keeps
    // batches full instead of alternating full and near-empty ones. A lone client never waits.
    let mut previous = 1usize;
    let mut previous_took = Duration::ZERO;
    loop {
        lanes.idle.fetch_add(1, Ordering::SeqCst);
        let collector = lanes.collector.lock().unwrap_or_else(|p| p.into_inner());
        let collected = lanes.collect(previous, previous_took);
        lanes.idle.fetch_sub(1, Ordering::SeqCst);
        let Some(Collected { works, wide }) = collected else {
            break;
        };
        // A batch on every core keeps the collector's place, so no other lane starts meanwhile.
        let (_collector, cores) = if wide {
            let cores = Cores::All {
                parts: lanes.count,
                pools,
            };
            (Some(collector), cores)
        } else {
            drop(collector);
            (None, Cores::One(pools.and_then(|p| p.get(lane))))
        };
        previous = works.len();
        let now = Instant::now();
        let mut live = Vec::with_capacity(works.len());
        for work in works {
            if work.deadline <= now {
                // Its caller is giving up now: answer without computing.
                let _ = work.reply.send(Err(ServeError::Timeout(work.timeout)));
                continue;
            }
            live.push(work);
        }
        let (classify, embed): (Vec<Work>, Vec<Work>) = live
            .into_iter()
            .partition(|w| w.purpose == Purpose::Classify);
        lanes.start();
        let started = Instant::now();
        let inputs: usize = classify
            .iter()
            .chain(embed.iter())
            .map(|w| w.inputs.len())
            .sum();
        if !classify.is_empty() {
            run_batches(model, classify, max_batch_tokens, cores, Purpose::Classify);
        }
        if !embed.is_empty() {
            run_batches(model, embed, max_batch_tokens, cores, Purpose::Embed);
        }
        previous_took = started.elapsed();
        lanes.finish();
        metrics::histogram!("kiln_serve_batch_inputs").record(inputs as f64);
        metrics::histogram!("kiln_serve_batch_seconds").record(previous_took.as_secs_f64());
    }
    tracing::debug!(model = %id, lane, "inference lane stopped (model unloaded)");
}

/// `n` one-thread rayon pools for the parts of a batch (made once per process; None if the
/// threads cannot be started, and the parts then share the global pool).
fn part_pools(n: usize) -> Option<&'static [rayon::ThreadPool]> {
    static POOLS: std::sync::OnceLock<Vec<rayon::ThreadPool>> = std::sync::OnceLock::new();
    let pools = POOLS.get_or_init(|| crate::train::cores::one_thread_pools(n, "kiln-serve-part"));
    (pools.len() >= n).then_some(pools.as_slice())
}

fn run_batches(
    model: &EncoderModel,
    works: Vec<Work>,
    max_batch_tokens: usize,
    cores: Cores<'_>,
    purpose: Purpose,
) {
    let threads = match cores {
        Cores::All { parts, .. } => parts,
        Cores::One(_) => 1,
    };
    let mut items: Vec<Item<'_>> = works
        .iter()
        .enumerate()
        .flat_map(|(w, work)| {
            work.inputs
                .iter()
                .enumerate()
                .map(move |(index, row)| Item {
                    work: w,
                    index,
                    row,
                })
        })
        .collect();
    // Longest first, so each batch pads to its own first row and few pads are computed.
    items.sort_by_key(|item| std::cmp::Reverse(item.row.ids.len()));
    let mut outputs: Vec<Vec<Option<Output>>> = works
        .iter()
        .map(|w| w.inputs.iter().map(|_| None).collect())
        .collect();
    // Batches bounded by padded tokens, each cut into `threads` parts that run at once: on
    // CPU a single forward pass leaves cores idle (only the larger matrix products use
    // several), so parts of a batch run side by side.
    let mut ranges = Vec::new();
    let mut start = 0;
    while start < items.len() {
        let longest = items[start].row.ids.len().max(1);
        let fit = (max_batch_tokens / longest).max(1);
        let end = (start + fit).min(items.len());
        let parts = threads.clamp(1, end - start);
        let size = (end - start).div_ceil(parts);
        let mut s = start;
        while s < end {
            ranges.push(s..(s + size).min(end));
            s += size;
        }
        start = end;
    }
    let next = AtomicUsize::new(0);
    type Computed = Result<Vec<Output>, String>;
    let workers = threads.clamp(1, ranges.len().max(1));
    // Parts running side by side each keep their matrix products on their own core (a
    // one-thread rayon pool): sharing the global pool, the parts' products oversubscribe the
    // cores and spend their time waking and parking each other's threads. A lone part on
    // every core keeps the global pool, whose products use every core.
    let pool_of = |w: usize| -> Option<&rayon::ThreadPool> {
        match cores {
            Cores::All { pools, .. } if workers > 1 => pools.and_then(|p| p.get(w)),
            Cores::All { .. } => None,
            Cores::One(pool) => pool,
        }
    };
    let results: Vec<(std::ops::Range<usize>, Computed)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..workers)
            .map(|w| {
                let pool = pool_of(w);
                let next = &next;
                let ranges = &ranges;
                let items = &items;
                scope.spawn(move || {
                    let run = || {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(range) = ranges.get(i) else { break };
                            let rows: Vec<&EncodedText> =
                                items[range.clone()].iter().map(|i| i.row).collect();
                            let out = match purpose {
                                Purpose::Classify => model
                                    .classify(&rows)
                                    .map(|v| v.into_iter().map(Output::Classify).collect()),
                                Purpose::Embed => model
                                    .embed(&rows)
                                    .map(|v| v.into_iter().map(Output::Embed).collect()),
                            };
                            done.push((range.clone(), out.map_err(|e| e.to_string())));
                        }
                        done
                    };
                    match pool {
                        Some(pool) => pool.install(run),
                        None => run(),
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let mut failed: Option<String> = None;
    if results.iter().map(|(r, _)| r.len()).sum::<usize>() != items.len() {
        failed = Some("an inference thread panicked".into());
    }
    for (range, out) in results {
        match out {
            Ok(out) => {
                for (item, o) in items[range].iter().zip(out) {
                    outputs[item.work][item.index] = Some(o);
                }
            }
            Err(e) => failed = Some(e),
        }
    }
    drop(items);
    for (work, out) in works.into_iter().zip(outputs) {
        let result = match &failed {
            Some(e) => Err(ServeError::Internal(e.clone())),
            None => out
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ServeError::Internal("an input was not computed".into())),
        };
        let _ = work.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn busy_request(
        serving: &Serving,
        model: &ModelRef,
    ) -> tokio::task::JoinHandle<Result<usize, ServeError>> {
        let texts: Vec<String> = (0..512).map(|_| "good movie bad ".repeat(30)).collect();
        let task = {
            let (serving, model) = (serving.clone(), model.clone());
            tokio::spawn(async move { serving.embed(&model, texts, true).await.map(|r| r.1.len()) })
        };
        // Until the request holds the model (it is loading it, or waiting for its pass).
        loop {
            let holding = serving
                .lock_cache()
                .get(&model.id)
                .is_some_and(|e| e.in_use.load(Ordering::SeqCst) > 0);
            if holding {
                return task;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retiring_a_model_waits_for_the_requests_using_it_and_refuses_later_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let artifacts = Artifacts::local(tmp.path().join("artifacts"))
            .await
            .unwrap();
        let serving = Serving::new(ServeSettings::default(), artifacts);
        let mut models = Vec::new();
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            let dir = tmp.path().join(name);
            crate::nn::tiny::write_tiny_bert(&dir, &crate::nn::tiny::tiny_bert_config(), i as u64)
                .unwrap();
            crate::nn::tiny::write_tiny_tokenizer(&dir, &["good", "bad", "movie"]).unwrap();
            models.push(ModelRef {
                id: name.into(),
                location: ModelLocation::Dir(dir),
            });
        }

        // A deadline shorter than the request: retire reports that it was still in use.
        let task = busy_request(&serving, &models[0]).await;
        assert!(!serving.retire("a", Duration::from_millis(1)).await);
        assert_eq!(
            task.await.unwrap().unwrap(),
            512,
            "the request still finishes"
        );

        // With time enough, it returns once the request is done, and the request succeeded.
        let task = busy_request(&serving, &models[1]).await;
        assert!(serving.retire("b", Duration::from_secs(60)).await);
        assert_eq!(task.await.unwrap().unwrap(), 512);

        // Retired models are not loaded again.
        for model in &models {
            match serving.embed(model, vec!["good".into()], true).await {
                Err(ServeError::Deleted(id)) => assert_eq!(id, model.id),
                other => panic!("a retired model answered: {:?}", other.map(|r| r.1.len())),
            }
            assert!(!serving.is_loaded(&model.id));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_requests_on_several_lanes_get_their_own_answers() {
        let tmp = tempfile::tempdir().unwrap();
        let artifacts = Artifacts::local(tmp.path().join("artifacts"))
            .await
            .unwrap();
        // More lanes than this machine may have cores: the lanes share the part pools.
        let settings = ServeSettings {
            threads: 3,
            ..ServeSettings::default()
        };
        let serving = Serving::new(settings, artifacts);
        let dir = tmp.path().join("m");
        crate::nn::tiny::write_tiny_bert(&dir, &crate::nn::tiny::tiny_bert_config(), 7).unwrap();
        let words = ["good", "bad", "movie", "plot", "acting"];
        crate::nn::tiny::write_tiny_tokenizer(&dir, &words).unwrap();
        let model = ModelRef {
            id: "m".into(),
            location: ModelLocation::Dir(dir),
        };
        // Requests of one to three texts of different lengths.
        let requests: Vec<Vec<String>> = (0..40)
            .map(|i| {
                (0..1 + i % 3)
                    .map(|j| {
                        (0..1 + (i * 7 + j * 3) % 23)
                            .map(|k| words[(i + j + k) % words.len()])
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .collect()
            })
            .collect();
        // Each alone first.
        let mut alone = Vec::new();
        for texts in &requests {
            let (_, out) = serving.embed(&model, texts.clone(), true).await.unwrap();
            alone.push(out);
        }
        // Then all at once, three times over, so that the lanes batch them in many ways.
        for _ in 0..3 {
            let tasks: Vec<_> = requests
                .iter()
                .map(|texts| {
                    let (serving, model, texts) = (serving.clone(), model.clone(), texts.clone());
                    tokio::spawn(async move { serving.embed(&model, texts, true).await })
                })
                .collect();
            for (i, task) in tasks.into_iter().enumerate() {
                let (_, out) = task.await.unwrap().unwrap();
                assert_eq!(out.len(), alone[i].len(), "request {i}");
                for ((got, n), (want, m)) in out.iter().zip(&alone[i]) {
                    assert_eq!(n, m, "request {i}: token counts");
                    let diff = got
                        .iter()
                        .zip(want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        diff < 1e-5,
                        "request {i}: differs by {diff} from its answer alone"
                    );
                }
            }
        }
    }
}
