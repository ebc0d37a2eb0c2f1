//! The devices kiln computes on: the `KILN_DEVICES` setting and the candle devices it names.
//!
//! `KILN_DEVICES` is a comma-separated list: `cpu`, `cuda:N` (GPU number N), or `cuda` (every
//! GPU the driver reports), e.g. `cuda:0,cuda:1`. The default build is CPU-only; a CUDA device
//! needs a binary built with `--features cuda` (scripts/build-cuda.sh), and asking a CPU-only
//! binary for one is an error that says so, never a silent fall back to the CPU.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// What a CPU-only kiln answers when asked for a GPU.
pub const NO_CUDA: &str = "this kiln was built without CUDA support: build with \
     `cargo build --release --features cuda` (scripts/build-cuda.sh)";

/// Whether this binary was built with CUDA support (`--features cuda`).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// One device (`--device`, `KILN_SERVE_DEVICE`).
    #[error("invalid device `{value}`: {reason}")]
    Parse { value: String, reason: String },
    /// An entry of a device list (`KILN_DEVICES`).
    #[error("invalid device `{value}` in KILN_DEVICES: {reason}")]
    ParseList { value: String, reason: String },
    #[error("{device}: {NO_CUDA}")]
    CudaNotBuilt { device: String },
    #[error("{device}: no such GPU (the CUDA driver reports {count})")]
    NoSuchGpu { device: DeviceSpec, count: usize },
    #[error("`cuda` asks for every GPU, but the CUDA driver reports none")]
    NoGpu,
    #[error("{device}: {message}")]
    Cuda { device: String, message: String },
}

/// One device: the CPU or one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceSpec {
    Cpu,
    /// `cuda:N`: the GPU with the CUDA ordinal N.
    Cuda(usize),
}

impl DeviceSpec {
    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }

    /// Opens the device: the CPU always; a GPU only in a binary built with `--features cuda`
    /// and a driver that reports it.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => open_cuda(ordinal),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// One entry of `KILN_DEVICES`: a device, or `cuda` for every GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    One(DeviceSpec),
    AllCuda,
}

fn parse_entry(raw: &str) -> Result<Entry, DeviceError> {
    let value = raw.trim().to_ascii_lowercase();
    let error = |reason: &str| DeviceError::Parse {
        value: raw.trim().to_owned(),
        reason: reason.to_owned(),
    };
    match value.as_str() {
        "" => Err(error("an empty entry")),
        "cpu" => Ok(Entry::One(DeviceSpec::Cpu)),
        "cuda" => Ok(Entry::AllCuda),
        _ => {
            let Some(n) = value.strip_prefix("cuda:") else {
                return Err(error("expected `cpu`, `cuda` (every GPU) or `cuda:N`"));
            };
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(error(
                    "the GPU number after `cuda:` must be a number, e.g. cuda:0",
                ));
            }
            n.parse()
                .map(|n| Entry::One(DeviceSpec::Cuda(n)))
                .map_err(|_| error("GPU number out of range"))
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    /// `cpu` or `cuda:N` (a single device: `cuda` alone names every GPU, see [`Devices`]).
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match parse_entry(s)? {
            Entry::One(spec) => Ok(spec),
            Entry::AllCuda => Err(DeviceError::Parse {
                value: s.trim().to_owned(),
                reason: "names every GPU, not one: give cuda:N".into(),
            }),
        }
    }
}

/// The value of `KILN_DEVICES`: `cpu`, `cuda`, `cuda:0,cuda:1`, ... (default `cpu`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Devices(Vec<Entry>);

impl Default for Devices {
    fn default() -> Self {
        Devices(vec![Entry::One(DeviceSpec::Cpu)])
    }
}

impl FromStr for Devices {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let mut entries = Vec::new();
        for raw in s.split(',') {
            let entry = parse_entry(raw).map_err(|e| match e {
                DeviceError::Parse { value, reason } => DeviceError::ParseList { value, reason },
                e => e,
            })?;
            if entries.contains(&entry) {
                return Err(DeviceError::ParseList {
                    value: raw.trim().to_owned(),
                    reason: "listed twice".into(),
                });
            }
            entries.push(entry);
        }
        Ok(Devices(entries))
    }
}

impl fmt::Display for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, entry) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match entry {
                Entry::One(spec) => write!(f, "{spec}")?,
                Entry::AllCuda => f.write_str("cuda")?,
            }
        }
        Ok(())
    }
}

impl Devices {
    /// Whether any entry is a GPU (the binary then needs CUDA support).
    pub fn wants_cuda(&self) -> bool {
        self.0
            .iter()
            .any(|e| matches!(e, Entry::AllCuda | Entry::One(DeviceSpec::Cuda(_))))
    }

    /// The devices, in the order given, with `cuda` replaced by every GPU the driver reports
    /// (`cuda:0`, `cuda:1`, ...) and repeats dropped. Asks the driver only when `cuda` is given.
    pub fn resolve(&self) -> Result<Vec<DeviceSpec>, DeviceError> {
        let mut out = Vec::new();
        for entry in &self.0 {
            let specs = match *entry {
                Entry::One(spec) => vec![spec],
                Entry::AllCuda => match cuda_device_count()? {
                    0 => return Err(DeviceError::NoGpu),
                    n => (0..n).map(DeviceSpec::Cuda).collect(),
                },
            };
            for spec in specs {
                if !out.contains(&spec) {
                    out.push(spec);
                }
            }
        }
        Ok(out)
    }

    /// Opens every device [`Devices::resolve`] names.
    pub fn open(&self) -> Result<Vec<(DeviceSpec, Device)>, DeviceError> {
        self.resolve()?
            .into_iter()
            .map(|spec| Ok((spec, spec.open()?)))
            .collect()
    }
}

/// How many GPUs the CUDA driver reports (an error in a CPU-only build, or without a driver).
pub fn cuda_device_count() -> Result<usize, DeviceError> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| DeviceError::Cuda {
                device: "cuda".into(),
                message: format!("the CUDA driver did not answer: {e}"),
            })
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(DeviceError::CudaNotBuilt {
            device: "cuda".into(),
        })
    }
}

fn open_cuda(ordinal: usize) -> Result<Device, DeviceError> {
    let spec = DeviceSpec::Cuda(ordinal);
    #[cfg(feature = "cuda")]
    {
        if let Ok(count) = cuda_device_count()
            && ordinal >= count
        {
            return Err(DeviceError::NoSuchGpu {
                device: spec,
                count,
            });
        }
        Device::new_cuda(ordinal).map_err(|e| DeviceError::Cuda {
            device: spec.to_string(),
            message: e.to_string(),
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(DeviceError::CudaNotBuilt {
            device: spec.to_string(),
        })
    }
}

/// The CUDA compute capability (major, minor) of a GPU device; `None` for the CPU.
pub fn compute_capability(device: &Device) -> Option<(u32, u32)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let (major, minor) = cuda.cuda_stream().context().compute_capability().ok()?;
        return Some((major.max(0) as u32, minor.max(0) as u32));
    }
    let _ = device;
    None
}

/// A GPU's memory in bytes, as its driver reports it; `None` for the CPU (or when the driver
/// does not answer).
pub fn total_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let total = cuda.cuda_stream().context().total_mem().ok()?;
        return Some(total as u64);
    }
    let _ = device;
    None
}

/// Whether the device computes in bf16 natively: GPUs of compute capability 8.0 (Ampere) or
/// newer. candle's own `Device::supports_bf16` answers true for every CUDA device, though
/// older GPUs have no bf16 arithmetic. On the CPU candle's bf16 is converted element by
/// element and is slower than f32, so the answer there is no.
pub fn supports_bf16(device: &Device) -> bool {
    compute_capability(device).is_some_and(|cap| cap >= (8, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(s: &str) -> Devices {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn single_devices_parse_and_print_back() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda:0", DeviceSpec::Cuda(0)),
            ("cuda:7", DeviceSpec::Cuda(7)),
            ("cuda:12", DeviceSpec::Cuda(12)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
            assert_eq!(spec.to_string(), text);
        }
        assert_eq!(
            " CUDA:1 ".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Cuda(1)
        );
        assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
    }

    #[test]
    fn bad_devices_are_refused_with_the_reason() {
        for (text, reason) in [
            ("", "empty"),
            ("gpu", "expected `cpu`, `cuda` (every GPU) or `cuda:N`"),
            ("cuda0", "expected"),
            ("cuda:", "must be a number"),
            ("cuda:-1", "must be a number"),
            ("cuda:+1", "must be a number"),
            ("cuda:x", "must be a number"),
            ("cuda:1.0", "must be a number"),
            ("cuda:99999999999999999999999", "out of range"),
            ("cuda", "names every GPU"),
        ] {
            let err = text.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains(reason), "{text:?}: {err}");
            // One device comes from --device or KILN_SERVE_DEVICE, not the list.
            assert!(!err.contains("KILN_DEVICES"), "{text:?}: {err}");
        }
    }

    #[test]
    fn device_lists_parse_and_print_back() {
        for text in [
            "cpu",
            "cuda",
            "cuda:0",
            "cuda:0,cuda:1",
            "cpu,cuda:1",
            "cuda:1,cuda",
        ] {
            assert_eq!(devices(text).to_string(), text);
        }
        assert_eq!(devices(" cuda:0 , cuda:1 ").to_string(), "cuda:0,cuda:1");
        assert_eq!(Devices::default().to_string(), "cpu");
        assert!(!devices("cpu").wants_cuda());
        assert!(devices("cuda").wants_cuda());
        assert!(devices("cpu,cuda:3").wants_cuda());
    }

    #[test]
    fn bad_device_lists_are_refused() {
        for (text, reason) in [
            ("", "empty"),
            ("cuda:0,", "empty"),
            (",cpu", "empty"),
            ("cuda:0,cuda:0", "listed twice"),
            ("cuda,cuda", "listed twice"),
            ("cpu,tpu", "expected"),
        ] {
            let err = text.parse::<Devices>().unwrap_err().to_string();
            assert!(err.contains(reason), "{text:?}: {err}");
            assert!(err.contains("in KILN_DEVICES"), "{text:?}: {err}");
        }
    }

    #[test]
    fn explicit_devices_resolve_in_order_without_asking_the_driver() {
        assert_eq!(devices("cpu").resolve().unwrap(), [DeviceSpec::Cpu]);
        assert_eq!(
            devices("cuda:1,cpu,cuda:0").resolve().unwrap(),
            [DeviceSpec::Cuda(1), DeviceSpec::Cpu, DeviceSpec::Cuda(0)]
        );
    }

    #[test]
    fn the_cpu_opens_and_has_no_bf16() {
        let opened = devices("cpu").open().unwrap();
        assert_eq!(opened.len(), 1);
        assert_eq!(opened[0].0, DeviceSpec::Cpu);
        assert!(opened[0].1.is_cpu());
        assert_eq!(compute_capability(&Device::Cpu), None);
        assert!(!supports_bf16(&Device::Cpu));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_only_build_refuses_gpus_and_names_the_feature() {
        const { assert!(!CUDA_BUILT) };
        let expected = "this kiln was built without CUDA support: build with \
                        `cargo build --release --features cuda` (scripts/build-cuda.sh)";
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert_eq!(err, format!("cuda:0: {expected}"));
        for list in ["cuda", "cuda:1", "cpu,cuda:0"] {
            let err = devices(list).open().unwrap_err().to_string();
            assert!(err.ends_with(expected), "{list}: {err}");
        }
        assert!(
            cuda_device_count()
                .unwrap_err()
                .to_string()
                .contains("--features cuda")
        );
    }

    /// On a GPU machine: `cargo test --release --features cuda --lib device -- --ignored`.
    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a GPU"]
    fn every_gpu_opens_and_multiplies() {
        let opened = devices("cuda").open().unwrap();
        assert!(!opened.is_empty());
        for (spec, device) in opened {
            let cap = compute_capability(&device).unwrap();
            let a = candle_core::Tensor::arange(0f32, 6., &device)
                .unwrap()
                .reshape((2, 3))
                .unwrap();
            let product = a.matmul(&a.t().unwrap()).unwrap();
            let product: Vec<Vec<f32>> = product.to_vec2().unwrap();
            assert_eq!(product, [[5., 14.], [14., 50.]]);
            eprintln!(
                "{spec}: compute capability {cap:?}, bf16 {}",
                supports_bf16(&device)
            );
        }
    }
}
