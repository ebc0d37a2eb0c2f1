"""Shared by bench/train_minilm.py and bench/decoder.py for `--device cuda` runs (issue 9):
the kiln and PyTorch device settings, the GPU's peak FLOP/s, and the training FLOPs behind the
model FLOP utilisation (MFU) figures.

Nothing here imports torch at module level: the parent processes of the benchmarks stay free
of it (only their worker children import torch).

Training FLOPs (the standard estimate, counting useful work only: padding is not counted):

    full fine-tuning   per token 6*N + 12*L*D*T   (forward 2N, backward 4N: input and weight grads)
    LoRA               per token 4*N + 6*N_a + 12*L*D*T
                       (frozen weights: forward 2N, backward 2N for the input grads only;
                        the adapters' own weights N_a train: 6 N_a)

N: the weights of the matrix products applied to every token (attention projections, MLP and,
for a decoder, the LM head; not the embedding lookups), L layers, D = heads x head_dim (the
attention width), T the example's own length in real tokens: attention is 2 matrix products of
2*T*D FLOPs per token and layer forward (QK^T and AV), x3 for forward + backward, counted over
the full T x T square (no saving for the causal mask, as in PaLM's appendix B). A classifier's
pooler and head (applied once per example) add 6 x their weights per example. Per example the
terms are summed over its T real tokens.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

# Dense (no sparsity) peaks in TFLOP/s, from NVIDIA's data sheets. H200 = H100 SXM (same chip
# and clocks; more and faster memory).
H100_SXM = {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}
H100_PCIE = {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0}

FULL_FORMULA = "6*N*T + 12*L*D*T^2 per example of T real tokens (+ 6*N_head per example)"
LORA_FORMULA = "(4*N + 6*N_lora)*T + 12*L*D*T^2 per example of T real tokens"


def gpu_peaks(name: str | None) -> tuple[str | None, dict | None]:
    """(card, peaks in TFLOP/s) for a device name as torch.cuda.get_device_name gives it;
    (None, None) for a card not in the table (MFU is then n/a)."""
    if not name:
        return None, None
    n = name.upper()
    if "H200" in n:
        return "H200 (as H100 SXM)", H100_SXM
    if "H100" in n:
        if "PCIE" in n:
            return "H100 PCIe", H100_PCIE
        if "SXM" in n or "HBM3" in n:  # "NVIDIA H100 80GB HBM3" is the SXM card
            return "H100 SXM", H100_SXM
    return None, None


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def kiln_device(device: str) -> str:
    """The `kiln train --device` value: `cuda` -> `cuda:0`; `cuda:N` and `cpu` as given."""
    return "cuda:0" if device == "cuda" else device


def kiln_device_args(device: str) -> list[str]:
    """Extra `kiln train` arguments: none for the CPU (so binaries that predate `--device` work);
    on a GPU the device and f32 compute, to compare with PyTorch's f32 configurations (kiln's
    `mixed_precision: auto` is bf16 on a GPU that computes bf16 natively)."""
    if device == "cpu":
        return []
    return ["--device", kiln_device(device), "--set", "mixed_precision=fp32"]


def setup_torch(torch, device: str, tf32: bool):
    """In a torch worker: the torch.device (`cuda` -> `cuda:0`, as kiln's), and on CUDA the f32
    matmul precision (TF32 off unless asked for, to match kiln's f32). Returns (device, what was
    set, for the results)."""
    dev = torch.device(kiln_device(device))
    info: dict = {"device": str(dev)}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        info.update(
            device_name=torch.cuda.get_device_name(dev),
            device_capability=".".join(map(str, torch.cuda.get_device_capability(dev))),
            cuda_runtime=torch.version.cuda,
            tf32=tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            float32_matmul_precision=torch.get_float32_matmul_precision(),
        )
        torch.cuda.reset_peak_memory_stats(dev)
    return dev, info


def sync(torch, dev) -> None:
    """Waits for the GPU's queued work (before reading a timer); nothing on the CPU."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gpu_memory(torch, dev) -> dict:
    if dev.type != "cuda":
        return {}
    return {
        "gpu_max_allocated_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1),
        "gpu_max_reserved_mib": round(torch.cuda.max_memory_reserved(dev) / 2**20, 1),
    }


def nvidia_smi() -> dict | None:
    """The first GPU as nvidia-smi reports it (None without nvidia-smi)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    f = [x.strip() for x in out[0].split(",")]
    keys = ["name", "driver", "memory", "max_sm_clock", "power_limit"]
    return dict(zip(keys, f))


# ---------------------------------------------------------------------------------------------
# FLOPs


def bert_shape(model_dir: Path, n_labels: int) -> dict:
    """Matrix-product weights of a BERT sequence classifier (config.json)."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    return {
        "layers": layers,
        "attn_width": h,
        "n_token": layers * (4 * h * h + 2 * h * i),  # q, k, v, o; intermediate, output
        "n_example": h * h + h * n_labels,  # pooler dense, classifier
    }


def decoder_shape(config: dict, lora_modules: list[str] | None = None, lora_rank: int = 0) -> dict:
    """Matrix-product weights of a Qwen2/Llama-shaped decoder (config.json as a dict), and of its
    LoRA adapters on `lora_modules` (rank r: r*(in+out) weights each)."""
    h, i, layers, v = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    dims = {  # (in, out)
        "q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }  # fmt: skip
    n_token = layers * sum(a * b for a, b in dims.values()) + h * v  # + the LM head
    mods = list(dims) if lora_modules and "all-linear" in lora_modules else (lora_modules or [])
    n_lora = layers * sum(lora_rank * (dims[m][0] + dims[m][1]) for m in mods)
    return {"layers": layers, "attn_width": heads * hd, "n_token": n_token, "n_example": 0, "n_lora": n_lora}


def train_flops(shape: dict, lengths: list[int], lora: bool = False) -> float:
    """Training FLOPs of one pass over examples of these real-token lengths (module docstring)."""
    c = (4 * shape["n_token"] + 6 * shape.get("n_lora", 0)) if lora else 6 * shape["n_token"]
    attn = 12 * shape["layers"] * shape["attn_width"]
    return float(sum(c * t + attn * t * t + 6 * shape["n_example"] for t in lengths))


def mfu_block(gpu_name: str | None, flops_per_unit: float, rates: dict[str, float | None], unit: str,
              formula: str, shape: dict, tf32_configs: tuple[str, ...] = ()) -> dict:
    """The MFU section of a results JSON: achieved TFLOP/s per configuration (rate x FLOPs per
    example or token) and its share of the card's FP32 and TF32 (and BF16) dense peaks."""
    card, peaks = gpu_peaks(gpu_name)
    configs = {}
    for name, rate in rates.items():
        tflops = rate * flops_per_unit / 1e12 if rate else None
        row: dict = {f"{unit}_per_s": rate, "tflops": tflops}
        for p in ("fp32", "tf32", "bf16"):
            row[f"mfu_{p}"] = tflops / peaks[p] if tflops is not None and peaks else None
        row["precision"] = "tf32" if name in tf32_configs else "fp32"
        configs[name] = row
    return {
        "formula": formula,
        "shape": shape,
        f"flops_per_{unit}": flops_per_unit,
        "gpu_name": gpu_name,
        "card": card,
        "peak_tflops_dense": peaks,
        "configs": configs,
    }


def print_mfu(block: dict) -> None:
    unit = next(k for k in block if k.startswith("flops_per_"))[len("flops_per_"):]
    peaks = block["peak_tflops_dense"]
    print()
    print(f"MFU: training FLOPs = {block['formula']}; "
          f"{block[f'flops_per_{unit}'] / 1e9:,.3f} GFLOP per {unit} (mean over the training data)")
    if peaks:
        print(f"peak ({block['gpu_name']} -> {block['card']}, dense): FP32 {peaks['fp32']}, "
              f"TF32 {peaks['tf32']}, BF16 {peaks['bf16']} TFLOP/s")
    else:
        print(f"peak: unknown for {block['gpu_name'] or 'this device'}: MFU n/a")
    pct = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    for name, r in block["configs"].items():
        t = "-" if r["tflops"] is None else f"{r['tflops']:.3f}"
        print(f"  {name} [{r['precision']}]: {t} TFLOP/s; MFU vs FP32 peak {pct(r['mfu_fp32'])}, "
              f"vs TF32 peak {pct(r['mfu_tf32'])}")
