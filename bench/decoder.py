#!/usr/bin/env python3
"""Decoder LM throughput: supervised fine-tuning (SFT) and generation, kiln vs PyTorch +
transformers, on the same random Qwen2-shaped model, the same data and the same machine, in one
run (issue #6, "Performance").

    cargo build --release --bin kiln
    python3 bench/decoder.py                       # defaults below, ~7 min on 2 idle cores
    python3 bench/decoder.py --wait-idle 600 --retries 2   # on a machine shared with other work
    python3 bench/decoder.py --only sft --repeats 1

What it does (each measured configuration in a fresh child process; repeats interleaved):

 1. Model: a child process builds `transformers.Qwen2ForCausalLM(Qwen2Config(...))` with a fixed
    seed (hidden 256, 4 layers, 4 query heads sharing 2 key/value heads, intermediate 1024,
    vocab 264, 1024 positions, tied embeddings, initializer_range 0.1; 4.0 M parameters) and
    saves it with `save_pretrained(safe_serialization=True)`, plus the tokenizer kiln's own test
    decoders use
    (src/nn/tiny.rs): byte-level BPE with no merges (one token per byte, ids 0..255) and the
    specials <|endoftext|> 256, <|im_start|> 257, <|im_end|> 258 (ids 259..263 are padding
    rows no text maps to), ChatML chat template, eos <|im_end|>, pad <|endoftext|>.
 2. Data: --train-examples seeded synthetic conversations (ASCII; one user turn, one assistant
    turn), each 100-200 tokens after the ChatML template.
 3. SFT. kiln: `kiln train --set strategy=full --set n_epochs=1 --set batch_size=8
    --set max_length=256 --set learning_rate=2e-5 --set warmup_ratio=0.1 --set weight_decay=0.01
    --json-progress`, RAYON_NUM_THREADS=--threads. PyTorch: the same model from the same directory,
    the loop a typical user writes (model(input_ids, attention_mask, labels) with the labels -100
    except on the assistant tokens, AdamW over the same parameter groups, linear schedule with 10 %
    warm-up, clipping at 1.0, loss.item() every step), torch.set_num_threads(--threads) and
    OMP/MKL_NUM_THREADS: "torch (default)" with torch.optim.AdamW's defaults and glibc malloc,
    "torch (best)" with AdamW(fused=True) and jemalloc (LD_PRELOAD, when installed).
    The loss mask is kiln's (src/data/chat.rs): the conversation rendered once; each assistant
    turn's span is the text between the rendering up to it (with the generation prompt) and the
    rendering through it, i.e. its content plus "<|im_end|>\\n"; a token is trained when its
    offset starts in a span. Batches are padded to their longest row (as kiln's lm_batch).
    Figure: tokens/s = real (non-pad) tokens of steps W+1..N / (t_N - t_W), W = --warmup-steps,
    N = the last step; the same tokens kiln's `tokens_per_second` counts (every non-pad token of
    the batch, not only the trained ones). kiln's t is when its `step` event arrives on stderr;
    PyTorch's is perf_counter() after the step. Batch order: a seeded shuffle on both sides, not
    the same permutation (kiln's is its own StdRng); each side's padded-token share is recorded.
 4. Generation. kiln: `kiln serve` (fresh database on the local PostgreSQL, KILN_MODELS_DIR with
    the model as bench/decoder, RAYON_NUM_THREADS and KILN_SERVE_THREADS = --threads) and
    `POST /v1/completions`
    {"prompt": P, "max_tokens": N, "temperature": 0} over loopback, one request at a time; the
    first request (loads the model) and one warm-up per prompt are not counted. PyTorch: the same
    directory, `model.generate(do_sample=False, max_new_tokens=N)` (KV cache, batch 1, the same
    stop ids as kiln: <|im_end|> and <|endoftext|>), tokenisation and decoding included, under
    torch.inference_mode(), one warm-up per prompt. Figure: completion tokens produced / seconds
    per call, summed over --prompts x --gen-repeats calls. Also "n=4": one prompt, 4 samples
    decoded side by side (kiln: "n": 4, "temperature": 1, "seed": s; PyTorch: do_sample=True,
    temperature 1, top_k 0, top_p 1, num_return_sequences=4), same stop ids; a sample that draws a
    stop token ends early (kiln drops its row from the batch and KV cache; transformers keeps
    computing it, padded, until every sample has ended). The two sides draw different random
    numbers, so their token counts differ: tokens/s counts the tokens actually produced. And
    "prefill": the same calls with max_tokens=1 (prompt pass + one token: the fixed cost of a call).
    Greedy outputs are compared between kiln and PyTorch (the decoded texts; identical expected).

On a shared machine, --wait-idle S waits (up to S seconds) before each run until the machine is
idle, and --retries N measures a run again when other processes used more than --max-other-cores
during it (machine-wide busy time from /proc/stat minus the run's own CPU).

Every figure, every run, the load average and the other processes' CPU around each run, the
machine, the git head and the kiln binary's SHA-256 go to bench/results/decoder-<YYYY-MM-DD-HHMMSS>.json.
Nothing asserts on timings.

LoRA (--strategy lora, default full): kiln gets `--set strategy=lora` with --lora-rank (8),
--lora-alpha (16), --lora-dropout (0.1) and --lora-modules (q_proj,v_proj), kiln's defaults;
PyTorch freezes every weight and wraps the same nn.Linear modules as kiln's adapters do
(y = W x + b + alpha/r * B(A dropout(x)), A uniform +-1/sqrt(in), B zeros; what PEFT's LoraLayer
computes) and trains only A and B, with the same optimizer settings.

On a GPU (issue 9): --device cuda (or cuda:N) runs the SFT half there (generation stays on the
CPU benchmark: --only sft is implied). kiln gets `--device cuda:N --set mixed_precision=fp32`; PyTorch moves the model and
batches to the GPU and synchronises before each timer read, in f32 with TF32 off to match kiln
(torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False);
--torch-tf32 adds "torch (best, tf32)". The MFU lines (also on the CPU with --flops) use the
training FLOPs of bench/gpu_util.py's docstring over the training data's real token counts,
against the card's dense FP32/TF32 peaks (n/a for a card not in its table). bench/gpu.sh runs
this with its GPU settings (a larger model shape).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_util  # noqa: E402
import lora_torch  # noqa: E402

MODEL_ID = "bench/decoder"
JEMALLOC_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
]
CLK_TCK = os.sysconf("SC_CLK_TCK")
CHILD_TIMEOUT: float | None = None  # --timeout: kill a child that runs longer (0/None: no limit)

# The tokenizer of src/nn/tiny.rs: 256 byte symbols, then these specials.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ENDOFTEXT, IM_START, IM_END = 256, 257, 258
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# kiln's stop ids for this model: config eos (258) + generation_config's [258, 256] + the
# tokenizer's eos (<|im_end|>).
STOP_IDS = [ENDOFTEXT, IM_END]

# Plain-text prompts for /v1/completions (no special tokens). Chosen so that the random model's
# greedy continuation does not hit a stop token before 128 tokens (checked in every run: the
# finish reasons and token counts are recorded).
PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the cat watches from the window.",
    "Write a short note to the team about the release schedule for next week.",
    "In 1887 the engineers finished the bridge across the river, and the town grew quickly.",
]

WORDS = (
    "the of and to in is was for on that with as by at from it an be this are or which have had "
    "not but were their one all been has more when will there can would who about other into than "
    "model data train token batch layer weight learning rate step loss value kiln server request "
    "window river bridge town engineer schedule release note team week quickly slowly carefully "
    "green blue small large early late first last new old good simple clear short long"
).split()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Model and data


def byte_level_symbols() -> list[str]:
    """GPT-2's byte-to-symbol table, as src/nn/tiny.rs writes it (id = byte value)."""
    printable = lambda b: 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or b >= 0xAE  # noqa: E731
    out, nxt = [], 256
    for b in range(256):
        if printable(b):
            out.append(chr(b))
        else:
            out.append(chr(nxt))
            nxt += 1
    return out


def write_tokenizer(d: Path, max_positions: int) -> None:
    """tokenizer.json and tokenizer_config.json exactly as src/nn/tiny.rs writes them."""
    vocab = {s: i for i, s in enumerate(byte_level_symbols())}
    added = [
        {"id": 256 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(SPECIALS)
    ]  # fmt: skip
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, "vocab": vocab, "merges": [],
        },
    }  # fmt: skip
    (d / "tokenizer.json").write_text(json.dumps(tokenizer))
    added_decoder = {
        str(256 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": True}
        for i, t in enumerate(SPECIALS)
    }  # fmt: skip
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": max_positions,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def model_worker(args) -> None:
    """Child process: writes the random Qwen2 model in Hugging Face layout to args.model_out."""
    import torch
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    out = Path(args.model_out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2Config(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        initializer_range=args.init_std,
        bos_token_id=None,
        eos_token_id=IM_END,
        pad_token_id=ENDOFTEXT,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(cfg).float().eval()
    model.generation_config.eos_token_id = [IM_END, ENDOFTEXT]
    model.generation_config.pad_token_id = ENDOFTEXT
    model.generation_config.bos_token_id = None
    model.save_pretrained(str(out), safe_serialization=True)
    write_tokenizer(out, args.max_positions)
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"parameters": n_params, "config": json.loads((out / "config.json").read_text())}))


def sentence(rng: random.Random, n_chars: int) -> str:
    words: list[str] = []
    length = 0
    while length < n_chars:
        w = rng.choice(WORDS)
        words.append(w)
        length += len(w) + 1
    text = " ".join(words)[:n_chars].rstrip()
    return text[0].upper() + text[1:] + "."


def make_data(work: Path, n: int, seed: int) -> tuple[Path, list[dict]]:
    """n conversations, 100-200 tokens each after the ChatML template (21 tokens of template,
    one token per ASCII character)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        total = rng.randint(100, 200) - 21 - 2  # template tokens, the two final periods
        user = rng.randint(20, max(21, total // 3))
        rows.append({"messages": [
            {"role": "user", "content": sentence(rng, user)},
            {"role": "assistant", "content": sentence(rng, total - user)},
        ]})  # fmt: skip
    path = work / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


# ---------------------------------------------------------------------------------------------
# Child process helpers (as bench/train_minilm.py)


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    except OSError:
        return None


def run_child(cmd: list[str], env: dict, on_stderr_line=None) -> dict:
    """Runs cmd; calls on_stderr_line(t, line, pid) as each stderr line arrives. Returns
    stdout, stderr lines, wall time, exit code and the child's rusage (peak RSS, CPU)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    err_lines: list[str] = []
    out_chunks: list[str] = []

    def read_err():
        for line in p.stderr:
            t = time.time()
            err_lines.append(line.rstrip("\n"))
            if on_stderr_line:
                on_stderr_line(t, line, p.pid)

    def read_out():
        out_chunks.append(p.stdout.read())

    th = [threading.Thread(target=read_err), threading.Thread(target=read_out)]
    for x in th:
        x.start()
    killer = threading.Timer(CHILD_TIMEOUT, p.kill) if CHILD_TIMEOUT else None
    if killer:
        killer.daemon = True
        killer.start()
    _, status, ru = os.wait4(p.pid, 0)
    if killer:
        killer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    for x in th:
        x.join()
    return {
        "rc": p.returncode,
        "stdout": "".join(out_chunks),
        "stderr": err_lines,
        "wall_s": time.time() - t0,
        "max_rss_mib": ru.ru_maxrss / 1024.0,
        "cpu_s": ru.ru_utime + ru.ru_stime,
    }


class BenchError(Exception):
    pass


def error_tail(lines: list[str]) -> str:
    """What to show of a failed child's stderr: from the first error line (`Error: ...` of
    anyhow, `panicked at`, a Python traceback) when there is one, since a backtrace
    (RUST_BACKTRACE=1) would push the message out of a plain tail; else the last 30 lines."""
    i = next((k for k, l in enumerate(lines)
              if l.startswith(("Error:", "Traceback")) or "panicked at" in l), None)
    if i is None:
        return "\n".join(lines[-30:])
    shown = lines[i:i + 30]
    return "\n".join(shown + ([f"... ({len(lines) - i - 30} more lines)"] if len(lines) > i + 30 else []))


def check(what: str, res: dict) -> None:
    if res["rc"] != 0:
        tail = error_tail(res["stderr"])
        raise BenchError(f"{what} failed (exit {res['rc']}):\n{tail}\n{res['stdout'][-2000:]}")


def last_json(res: dict) -> dict:
    return json.loads(res["stdout"].strip().splitlines()[-1])


def torch_env(args, best: bool) -> tuple[dict, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(args.threads)
    env.pop("LD_PRELOAD", None)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    allocator = "glibc"
    if best and not args.no_jemalloc:
        je = next((p for p in JEMALLOC_CANDIDATES if os.path.exists(p)), None)
        if je:
            env["LD_PRELOAD"] = je
            allocator = "jemalloc"
    return env, allocator


def worker_cmd(args, worker: str, *extra: str) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "--worker", worker,
        "--threads", str(args.threads), "--seed", str(args.seed), *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# SFT: kiln


def lora_settings(args) -> list[str]:
    if args.strategy != "lora":
        return []
    return [
        "--set", f"lora_rank={args.lora_rank}",
        "--set", f"lora_alpha={args.lora_alpha}",
        "--set", f"lora_dropout={args.lora_dropout}",
        "--set", "lora_target_modules=" + json.dumps(args.lora_modules.split(",")),
    ]  # fmt: skip


def sft_settings(args) -> list[str]:
    return [
        "--set", f"strategy={args.strategy}",
        "--set", "n_epochs=1",
        "--set", f"batch_size={args.batch_size}",
        "--set", f"max_length={args.max_length}",
        "--set", f"learning_rate={args.learning_rate}",
        "--set", "warmup_ratio=0.1",
        "--set", "weight_decay=0.01",
        "--set", "max_grad_norm=1.0",
        "--set", "lr_scheduler=linear",
        *lora_settings(args),
    ]  # fmt: skip


def run_kiln_sft(args, model: Path, train: Path, work: Path, rep: int, candle_ops: bool = False) -> dict:
    out = work / f"kiln-sft-{rep}{'-candle-ops' if candle_ops else ''}"
    env = dict(os.environ)
    env["RAYON_NUM_THREADS"] = str(args.threads)
    env.pop("LD_PRELOAD", None)
    env.pop("GLIBC_TUNABLES", None)
    env.pop("KILN_DEVICE_KERNELS", None)
    if candle_ops:
        # The GPU's optimizer, norms, softmax, activations and dropout as candle ops, not kiln's.
        env["KILN_DEVICE_KERNELS"] = "candle"
    env.setdefault("KILN_LOG", "warn")
    env["KILN_DATA_DIR"] = str(work / "kiln-data")
    cmd = [
        str(args.kiln), "train",
        "--model", str(model),
        "--training-file", str(train),
        "--output", str(out),
        "--seed", str(args.seed),
        "--json-progress",
        *sft_settings(args),
        *gpu_util.kiln_device_args(args.device),
    ]  # fmt: skip
    steps: dict[int, dict] = {}
    events: list[tuple[float, dict]] = []

    def on_line(t, line, pid):
        try:
            ev = json.loads(line)
        except ValueError:
            return
        if ev.get("type") == "step":
            steps[ev["step"]] = {"t": t, "cpu": cpu_seconds(pid), "tokens": ev["trained_tokens"],
                                 "loss": ev["train_loss"], "kiln_tps": ev["tokens_per_second"]}
        events.append((t, ev))

    res = run_child(cmd, env, on_line)
    check("kiln train", res)
    final = last_json(res)
    started = next((ev for _, ev in events if ev.get("type") == "started"), {})
    w, n = args.warmup_steps, max(steps)
    a, b = steps[w], steps[n]
    dt_ = b["t"] - a["t"]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_suffix(".work"), ignore_errors=True)
    return {
        "side": "kiln",
        "steps": n,
        "timed_steps": f"{w + 1}..{n}",
        "train_tokens_per_s": (b["tokens"] - a["tokens"]) / dt_,
        "timed_tokens": b["tokens"] - a["tokens"],
        "cores_used": (b["cpu"] - a["cpu"]) / dt_ if a["cpu"] is not None and b["cpu"] is not None else None,
        "kiln_reported_tokens_per_s": b["kiln_tps"],
        "train_tokens_epoch": started.get("train_tokens"),
        "first_loss": steps[1]["loss"],
        "last_loss": b["loss"],
        "step_s": [round(steps[s]["t"] - steps[s - 1]["t"], 4) for s in range(2, n + 1)],
        "max_rss_mib": res["max_rss_mib"],
        "wall_s": res["wall_s"],
        "cpu_s": res["cpu_s"],
        "own_cpu_s": res["cpu_s"],
        "final_status": final.get("status"),
    }


# ---------------------------------------------------------------------------------------------
# SFT: PyTorch (child: --worker sft)


def is_no_decay(name: str) -> bool:
    """kiln's rule (src/train/optim.rs is_no_decay)."""
    n = name.lower()
    return n.endswith("bias") or "layernorm" in n or "layer_norm" in n or n.endswith(".gamma") or n.endswith(".beta")


def encode_chat(tok, messages: list[dict], max_length: int) -> tuple[list[int], list[bool]]:
    """kiln's encode_chat (src/data/chat.rs): render once, locate each assistant turn by rendering
    up to it (with the generation prompt) and through it, map character spans to tokens by their
    offsets, truncate to max_length."""
    render = lambda ms, gen: tok.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        assert full.startswith(before) and full.startswith(through), "template is not incremental"
        spans.append((len(before), len(through)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    trained = [e > s and any(a <= s < b for a, b in spans) for s, e in enc["offset_mapping"]]
    return ids[:max_length], trained[:max_length]


def sft_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    best = args.variant == "best"
    dev, dinfo = gpu_util.setup_torch(torch, args.device, args.tf32)
    cuda = dev.type == "cuda"
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(l) for l in Path(args.training_file).read_text().splitlines() if l.strip()]
    data = [encode_chat(tok, r["messages"], args.max_length) for r in rows]
    pad = tok.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.strategy == "lora":
        n_adapted = lora_torch.add_lora(torch, model, args.lora_modules.split(","), args.lora_rank, args.lora_alpha,
                             args.lora_dropout)
    if cuda:
        model.to(dev)
    model.train()

    def batch(items):
        n = max(len(ids) for ids, _ in items)
        ids_t = torch.full((len(items), n), pad, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        labels = torch.full((len(items), n), -100, dtype=torch.long)
        for i, (ids, tr) in enumerate(items):
            ids_t[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            labels[i, : len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, tr)])
        if cuda:
            ids_t, mask, labels = ids_t.to(dev), mask.to(dev), labels.to(dev)
        return ids_t, mask, labels, sum(len(ids) for ids, _ in items), len(items) * n

    # tied lm_head appears once (as embed_tokens); LoRA: the adapters only
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not is_no_decay(n)], "weight_decay": 0.01},
        {"params": [p for n, p in named if is_no_decay(n)], "weight_decay": 0.0},
    ]
    params = [p for g in groups for p in g["params"]]
    lr = args.learning_rate
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True if best else None)
    total = math.ceil(len(data) / args.batch_size)
    warm = round(total * 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    order = list(range(len(data)))
    random.Random(args.seed).shuffle(order)
    marks = []  # (time, cpu, real tokens so far, padded tokens so far, loss)
    real = padded = 0
    for i in range(0, len(order), args.batch_size):
        ids, mask, labels, n_real, n_padded = batch([data[j] for j in order[i : i + args.batch_size]])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        real += n_real
        padded += n_padded
        gpu_util.sync(torch, dev)
        marks.append((time.perf_counter(), time.process_time(), real, padded, value))
    w = args.warmup_steps
    a, b = marks[w - 1], marks[-1]
    dt_ = b[0] - a[0]
    extra = {}
    if args.strategy == "lora":
        extra.update(strategy="lora", lora_modules_adapted=n_adapted,
                     trainable_parameters=sum(p.numel() for _, p in named))
    if cuda:
        extra.update(dinfo, **gpu_util.gpu_memory(torch, dev))
    print(json.dumps({
        "side": "torch",
        "variant": args.variant,
        "steps": len(marks),
        "timed_steps": f"{w + 1}..{len(marks)}",
        "train_tokens_per_s": (b[2] - a[2]) / dt_,
        "timed_tokens": b[2] - a[2],
        "timed_padded_tokens": b[3] - a[3],
        "cores_used": (b[1] - a[1]) / dt_,
        "train_tokens_epoch": sum(len(ids) for ids, _ in data),
        "trained_tokens_epoch": sum(sum(tr[1:]) for _, tr in data),
        "first_loss": marks[0][4],
        "last_loss": b[4],
        "step_s": [round(y[0] - x[0], 4) for x, y in zip(marks, marks[1:])],
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "num_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        **extra,
    }))  # fmt: skip


def sft_lengths(model: Path, rows: list[dict], max_length: int) -> list[int]:
    """Real tokens of each training conversation (after the template, truncated), as the SFT
    workers encode them: for the FLOPs of the MFU lines."""
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(model))
    return [len(encode_chat(tok, r["messages"], max_length)[0]) for r in rows]


def run_torch_sft(args, model: Path, train: Path, variant: str, tf32: bool = False) -> dict:
    env, allocator = torch_env(args, variant == "best")
    cmd = worker_cmd(
        args, "sft", "--variant", variant, "--model-dir", str(model), "--training-file", str(train),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--learning-rate", str(args.learning_rate), "--warmup-steps", str(args.warmup_steps),
    )  # fmt: skip
    if args.strategy != "full":
        cmd += ["--strategy", args.strategy, "--lora-rank", str(args.lora_rank), "--lora-alpha", str(args.lora_alpha),
                "--lora-dropout", str(args.lora_dropout), "--lora-modules", args.lora_modules]
    if args.device != "cpu":
        cmd += ["--device", args.device]
    if tf32:
        cmd += ["--tf32"]
    res = run_child(cmd, env)
    check(f"torch sft ({variant}{', tf32' if tf32 else ''})", res)
    r = last_json(res)
    r.update(allocator=allocator, max_rss_mib=res["max_rss_mib"], wall_s=res["wall_s"], cpu_s=res["cpu_s"],
             own_cpu_s=res["cpu_s"])
    return r


# ---------------------------------------------------------------------------------------------
# Generation: kiln


def kiln_generate_rep(args, server, key: str, prompts: list[str]) -> dict:
    from serve_minilm import request_json

    def call(body: dict) -> tuple[float, dict]:
        t0 = time.perf_counter()
        status, resp = request_json(server, key, "POST", "/v1/completions", body, timeout=600)
        s = time.perf_counter() - t0
        if status != 200:
            raise BenchError(f"POST /v1/completions gave {status}: {str(resp)[:500]}")
        return s, resp

    greedy = lambda p, n: {"model": MODEL_ID, "prompt": p, "max_tokens": n, "temperature": 0}  # noqa: E731
    cpu0, client0 = cpu_seconds(server.pid), time.process_time()
    out = {"greedy": [], "prefill": [], "n4": []}
    for p in prompts:
        call(greedy(p, args.gen_tokens))  # warm-up
        for _ in range(args.gen_repeats):
            s, resp = call(greedy(p, args.gen_tokens))
            out["greedy"].append({"prompt": prompts.index(p), "s": s, "tokens": resp["usage"]["completion_tokens"],
                                  "prompt_tokens": resp["usage"]["prompt_tokens"],
                                  "finish_reason": resp["choices"][0]["finish_reason"],
                                  "text": resp["choices"][0]["text"]})
        for _ in range(args.gen_repeats):
            s, resp = call(greedy(p, 1))
            out["prefill"].append({"prompt": prompts.index(p), "s": s, "tokens": resp["usage"]["completion_tokens"]})
    if args.n_samples > 1:
        body = {"model": MODEL_ID, "prompt": prompts[0], "max_tokens": args.gen_tokens,
                "temperature": 1.0, "top_p": 1.0, "n": args.n_samples}
        call(dict(body, seed=999))  # warm-up
        for r in range(args.gen_repeats):
            s, resp = call(dict(body, seed=args.seed + r))
            out["n4"].append({"s": s, "tokens": resp["usage"]["completion_tokens"],
                              "finish_reasons": [c["finish_reason"] for c in resp["choices"]]})
    # The fixed cost of one request without the model: an authenticated GET on a new connection
    # (every call above opens its own connection too).
    get_s = []
    for _ in range(5):
        t0 = time.perf_counter()
        status, _ = request_json(server, key, "GET", f"/v1/models/{MODEL_ID}")
        get_s.append(time.perf_counter() - t0)
    out["get_model_ms"] = [round(x * 1000, 3) for x in get_s]
    cpu1 = cpu_seconds(server.pid)
    out["server_cpu_s"] = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    r = summarise_generation("kiln", out)
    r["own_cpu_s"] = (out["server_cpu_s"] or 0.0) + time.process_time() - client0  # server + this client
    r["get_model_ms_median"] = median(out["get_model_ms"])
    return r


def summarise_generation(side: str, out: dict) -> dict:
    def rate(items):
        s = sum(x["s"] for x in items)
        return sum(x["tokens"] for x in items) / s if s else None

    r = {"side": side, "calls": out}
    r["greedy_tokens_per_s"] = rate(out["greedy"])
    r["greedy_tokens"] = [x["tokens"] for x in out["greedy"]]
    r["prefill_s_median"] = median([x["s"] for x in out["prefill"]])
    g = median([x["s"] for x in out["greedy"]])
    toks = median([x["tokens"] for x in out["greedy"]])
    # Decode only: the extra time for the tokens after the first, per token.
    if g and r["prefill_s_median"] and toks and toks > 1:
        r["decode_tokens_per_s"] = (toks - 1) / (g - r["prefill_s_median"])
    if out["n4"]:
        r["n4_tokens_per_s"] = rate(out["n4"])
        r["n4_tokens"] = [x["tokens"] for x in out["n4"]]
    return r


def bench_kiln_generation(args, work: Path, model: Path, prompts: list[str], reps: int, measure, on_rep) -> None:
    """Starts kiln serve once; runs each round through measure(label, fn) and calls
    on_rep(rep, result) after it (the caller runs PyTorch in between, with the server idle)."""
    from serve_minilm import Database, Server, request_json

    models = work / "models" / MODEL_ID
    models.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model, models)
    db = Database(args.database_url)
    server = None
    try:
        admin_key = f"bench-admin-{secrets.token_hex(16)}"
        env = dict(
            os.environ,
            KILN_ADDR="127.0.0.1:0",
            KILN_MODELS_DIR=str(work / "models"),
            KILN_DATA_DIR=str(work / "serve-data"),
            KILN_ADMIN_KEY=admin_key,
            KILN_WORKERS="0",
            KILN_LOG="warn",
            KILN_SERVE_TIMEOUT_SECS="600",
            KILN_SERVE_THREADS=str(args.threads),
            RAYON_NUM_THREADS=str(args.threads),
            DATABASE_URL=db.url,
        )
        env.pop("LD_PRELOAD", None)
        server = Server(str(args.kiln), env, work / "serve.log")
        log(f"kiln serve (pid {server.pid}) listening on {server.base}")
        status, body = request_json(server, admin_key, "POST", "/v1/keys", {"project": "bench"})
        key = body.get("key") if status == 200 and isinstance(body, dict) else None
        if not key:
            log(f"POST /v1/keys gave {status} {str(body)[:200]}: using the admin key")
            key = admin_key
        t0 = time.perf_counter()
        status, body = request_json(server, key, "POST", "/v1/completions",
                                    {"model": MODEL_ID, "prompt": prompts[0], "max_tokens": 1, "temperature": 0},
                                    timeout=600)  # fmt: skip
        if status != 200:
            raise BenchError(f"first POST /v1/completions gave {status}: {body}")
        log(f"kiln: first request (loads the model): {time.perf_counter() - t0:.2f} s")
        for rep in range(reps):
            try:
                r = measure(f"generation kiln [{rep + 1}]", lambda: kiln_generate_rep(args, server, key, prompts))
            except Exception:
                log(f"kiln serve log (tail):\n{server.log_tail()}")
                raise
            r.update(server_rss_mib=proc_rss_mib(server.pid))
            on_rep(rep, r)
    finally:
        if server is not None:
            code = server.terminate()
            log(f"kiln serve stopped (exit status {code})")
        db.drop()


def proc_rss_mib(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Generation: PyTorch (child: --worker generate)


def generate_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = json.loads(args.prompts)

    def call(prompt: str, n_tokens: int, sample_seed: int | None = None):
        t0 = time.perf_counter()
        enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
        kw = dict(max_new_tokens=n_tokens, eos_token_id=STOP_IDS, pad_token_id=ENDOFTEXT, use_cache=True)
        if sample_seed is None:
            kw.update(do_sample=False)
        else:
            torch.manual_seed(sample_seed)
            kw.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=args.n_samples)
        out = model.generate(**enc, **kw)
        new = out[:, enc["input_ids"].shape[1]:]
        texts, counts, reasons = [], [], []
        for row in new.tolist():
            ids = []
            reason = "length"
            for t in row:
                if t in STOP_IDS:
                    reason = "stop"
                    break
                ids.append(t)
            texts.append(tok.decode(ids, skip_special_tokens=True))
            counts.append(len(ids))
            reasons.append(reason)
        return time.perf_counter() - t0, texts, counts, reasons, enc["input_ids"].shape[1]

    out = {"greedy": [], "prefill": [], "n4": []}
    cpu0 = time.process_time()
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            call(p, args.gen_tokens)  # warm-up
            for _ in range(args.gen_repeats):
                s, texts, counts, reasons, n_prompt = call(p, args.gen_tokens)
                out["greedy"].append({"prompt": i, "s": s, "tokens": counts[0], "prompt_tokens": n_prompt,
                                      "finish_reason": reasons[0], "text": texts[0]})
            for _ in range(args.gen_repeats):
                s, _, counts, _, _ = call(p, 1)
                out["prefill"].append({"prompt": i, "s": s, "tokens": counts[0]})
        if args.n_samples > 1:
            call(prompts[0], args.gen_tokens, sample_seed=999)  # warm-up
            for r in range(args.gen_repeats):
                s, _, counts, reasons, _ = call(prompts[0], args.gen_tokens, sample_seed=args.seed + r)
                out["n4"].append({"s": s, "tokens": sum(counts), "finish_reasons": reasons})
    r = summarise_generation("torch", out)
    r.update(cpu_s=time.process_time() - cpu0, torch=torch.__version__, transformers=transformers.__version__,
             attn_implementation=getattr(model.config, "_attn_implementation", None), num_threads=torch.get_num_threads())
    print(json.dumps(r))


def run_torch_generation(args, model: Path, prompts: list[str]) -> dict:
    env, allocator = torch_env(args, False)
    cmd = worker_cmd(
        args, "generate", "--model-dir", str(model), "--prompts", json.dumps(prompts),
        "--gen-tokens", str(args.gen_tokens), "--gen-repeats", str(args.gen_repeats),
        "--n-samples", str(args.n_samples),
    )  # fmt: skip
    res = run_child(cmd, env)
    check("torch generate", res)
    r = last_json(res)
    r.update(allocator=allocator, max_rss_mib=res["max_rss_mib"], wall_s=res["wall_s"], own_cpu_s=res["cpu_s"])
    return r


# ---------------------------------------------------------------------------------------------
# Driver


def git_output(*a: str) -> str:
    """`git -C REPO ...`'s output; "" where there is no git (a GPU machine with a copied tree)."""
    try:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def busy_jiffies() -> int:
    """Machine-wide non-idle CPU time (all cores), in clock ticks, from /proc/stat."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(vals[:8]) - vals[3] - vals[4]  # minus idle and iowait


def busy_cores(seconds: float) -> float:
    b0, t0 = busy_jiffies(), time.time()
    time.sleep(seconds)
    return (busy_jiffies() - b0) / CLK_TCK / (time.time() - t0)


def wait_idle(args) -> tuple[float, float | None]:
    """Waits (at most --wait-idle seconds) until the machine uses under --idle-below cores over
    3 s; returns the seconds waited and the last figure."""
    if args.wait_idle <= 0:
        return 0.0, None
    start, said = time.time(), 0.0
    while True:
        b = busy_cores(3.0)
        waited = time.time() - start
        if b < args.idle_below or waited >= args.wait_idle:
            if b >= args.idle_below:
                log(f"the machine is still busy ({b:.2f} cores) after {waited:.0f} s: measuring anyway")
            return waited, b
        if waited - said >= 60 or said == 0.0:
            log(f"waiting for the machine to be idle ({b:.2f} cores busy, {waited:.0f} s so far)")
            said = waited or 1e-9


def make_measure(args, disturbed: list):
    """measure(label, fn): waits for an idle machine (--wait-idle), runs fn (which returns a
    dict with own_cpu_s: the CPU seconds of what it measured) and records the load average and
    the cores other processes used meanwhile (machine-wide busy time from /proc/stat minus
    own_cpu_s, over the wall time); when those exceed --max-other-cores the run is repeated, up
    to --retries times (the disturbed runs are kept in the JSON)."""

    def measure(label: str, fn):
        for attempt in range(args.retries + 1):
            waited, idle_before = wait_idle(args)
            la0, b0, t0 = loadavg(), busy_jiffies(), time.time()
            r = fn()
            wall = time.time() - t0
            busy = (busy_jiffies() - b0) / CLK_TCK / wall
            other = max(0.0, busy - r["own_cpu_s"] / wall)
            r.update(loadavg_before=la0, loadavg_after=loadavg(), machine_busy_cores=round(busy, 3),
                     other_cores=round(other, 3), waited_for_idle_s=round(waited, 1),
                     busy_cores_before=idle_before, attempt=attempt + 1)
            if other <= args.max_other_cores or attempt == args.retries:
                if other > args.max_other_cores:
                    log(f"{label}: other processes used {other:.2f} cores during the run (kept: no retries left)")
                return r
            log(f"{label}: other processes used {other:.2f} cores during the run: measuring again")
            disturbed.append(dict(r, label=label))

    return measure


def machine() -> dict:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split("\n")[0]
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "mem": mem.split(":")[1].strip(),
            "kernel": platform.release(), "python": platform.python_version()}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=1):
    return "-" if x is None else f"{x:,.{nd}f}"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", type=Path, default=REPO / "target/release/kiln")
    ap.add_argument("--only", choices=["sft", "generation"], default=None, help="run one half only")
    ap.add_argument("--train-examples", type=int, default=240, help="= steps x batch size (240: 30 steps)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--learning-rate", type=float, default=2e-5)
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps excluded from timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="SFT runs per configuration (interleaved)")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--gen-repeats", type=int, default=3, help="measured calls per prompt and per rep")
    ap.add_argument("--gen-reps", type=int, default=2, help="generation rounds per side (interleaved)")
    ap.add_argument("--n-samples", type=int, default=4, help="samples of the n>1 figure; 1 skips it")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-jemalloc", action="store_true", help="torch (best) keeps glibc malloc")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="before each run, wait up to this many seconds for the machine to be idle (0: no wait)")
    ap.add_argument("--idle-below", type=float, default=0.3, help="'idle': fewer busy cores than this over 3 s")
    ap.add_argument("--retries", type=int, default=0,
                    help="measure a run again (up to this many times) when other processes used more than "
                    "--max-other-cores cores during it")
    ap.add_argument("--max-other-cores", type=float, default=0.3)
    ap.add_argument("--database-url", default=os.environ.get("KILN_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--out", type=Path, default=None, help="results JSON [bench/results/decoder-DATE-TIME.json]")
    ap.add_argument("--strategy", choices=["full", "lora"], default="full", help="what SFT trains (both sides)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-dropout", type=float, default=0.1)
    ap.add_argument("--lora-modules", default="q_proj,v_proj", help="comma-separated (or all-linear)")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default) or cuda / cuda:N: SFT on the GPU for both sides (implies --only sft)")
    ap.add_argument("--torch-tf32", action="store_true",
                    help="on a GPU, also run 'torch (best, tf32)': PyTorch with TF32 matmuls")
    ap.add_argument("--flops", action="store_true", help="print the FLOP/s and MFU lines on the CPU too")
    ap.add_argument("--keep-going", action="store_true",
                    help="an SFT configuration that fails is recorded under 'errors' and the others still run")
    ap.add_argument("--timeout", type=float, default=0.0, help="kill a child process after this many seconds (0: never)")
    # model shape
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate-size", type=int, default=1024)
    ap.add_argument("--vocab-size", type=int, default=264)
    ap.add_argument("--max-positions", type=int, default=1024)
    ap.add_argument("--init-std", type=float, default=0.1,
                    help="initializer_range: at 0.02 a random model's greedy output is one token repeated, "
                    "which makes the kiln/PyTorch comparison of greedy outputs meaningless")
    # workers
    ap.add_argument("--worker", choices=["model", "sft", "generate"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=["default", "best"], default="default", help=argparse.SUPPRESS)
    ap.add_argument("--model-out", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", dest="model", help=argparse.SUPPRESS)
    ap.add_argument("--training-file", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--tf32", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device != "cpu" and not gpu_util.is_cuda(args.device):
        ap.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if gpu_util.is_cuda(args.device) and args.worker is None:
        if args.only == "generation":
            ap.error("--device cuda runs the SFT half only (generation is measured on the CPU)")
        args.only = "sft"
    return args


def main() -> int:
    args = parse_args()
    if args.worker == "model":
        return model_worker(args)
    if args.worker == "sft":
        return sft_worker(args)
    if args.worker == "generate":
        return generate_worker(args)
    global CHILD_TIMEOUT
    CHILD_TIMEOUT = args.timeout or None
    cuda = gpu_util.is_cuda(args.device)
    if not args.kiln.is_file():
        sys.exit(f"{args.kiln} not found: run `cargo build --release --bin kiln` first (or pass --kiln)")

    started = dt.datetime.now()
    git = git_output
    doc: dict = {
        "benchmark": "decoder",
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": machine(),
        "git_head": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "kiln_version": subprocess.run([str(args.kiln), "--version"], capture_output=True, text=True).stdout.strip(),
        "kiln_binary": {
            "path": str(args.kiln),
            "modified": dt.datetime.fromtimestamp(args.kiln.stat().st_mtime).isoformat(timespec="seconds"),
            "sha256": hashlib.sha256(args.kiln.read_bytes()).hexdigest(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("worker", "variant", "model_out", "model", "training_file", "prompts", "tf32")},
        "loadavg_start": loadavg(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-decoder-"))
    disturbed: list[dict] = []
    doc["disturbed_runs"] = disturbed
    measure = make_measure(args, disturbed)
    errors: list[dict] = []
    if cuda:
        doc["gpu"] = gpu_util.nvidia_smi()
    try:
        model = tmp / "model"
        env, _ = torch_env(args, False)
        res = run_child(worker_cmd(
            args, "model", "--model-out", str(model), "--vocab-size", str(args.vocab_size),
            "--hidden-size", str(args.hidden_size), "--layers", str(args.layers), "--heads", str(args.heads),
            "--kv-heads", str(args.kv_heads), "--intermediate-size", str(args.intermediate_size),
            "--max-positions", str(args.max_positions), "--init-std", str(args.init_std)), env)  # fmt: skip
        check("building the model", res)
        doc["model"] = last_json(res)
        log(f"model: {doc['model']['parameters']:,} parameters in {model}")

        if args.only in (None, "sft"):
            train, rows = make_data(tmp, args.train_examples, args.seed)
            doc["data"] = {"examples": len(rows), "file_bytes": train.stat().st_size}
            configs = [
                ("kiln", lambda rep: run_kiln_sft(args, model, train, tmp, rep)),
                ("torch (default)", lambda rep: run_torch_sft(args, model, train, "default")),
                ("torch (best)", lambda rep: run_torch_sft(args, model, train, "best")),
            ]
            if cuda and args.torch_tf32:
                configs.append(("torch (best, tf32)", lambda rep: run_torch_sft(args, model, train, "best", tf32=True)))
            if cuda:
                # What kiln's CUDA kernels (optimizer, dropout) are worth: candle's ops in their place.
                configs.insert(1, ("kiln (candle ops)", lambda rep: run_kiln_sft(args, model, train, tmp, rep, candle_ops=True)))
            if cuda or args.flops:
                doc["sft_lengths"] = sft_lengths(model, rows, args.max_length)
            runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
            for rep in range(args.repeats):
                for name, fn in configs:
                    try:
                        r = measure(f"SFT {name} [{rep + 1}]", lambda: fn(rep))
                    except Exception as e:  # noqa: BLE001
                        if not args.keep_going:
                            raise
                        msg = str(e) if isinstance(e, BenchError) else traceback.format_exc()
                        errors.append({"config": name, "repeat": rep + 1, "error": msg[:6000]})
                        log(f"[{rep + 1}/{args.repeats}] SFT {name:<16} FAILED (--keep-going): {msg[:3000]}")
                        continue
                    runs[name].append(r)
                    log(f"[{rep + 1}/{args.repeats}] SFT {name:<16} {fmt(r['train_tokens_per_s'])} tokens/s, "
                        f"cores {fmt(r.get('cores_used'), 2)}, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, "
                        f"peak RSS {fmt(r['max_rss_mib'], 0)} MiB, load {r['loadavg_before'][0]:.2f}, "
                        f"other processes {r['other_cores']:.2f} cores")
            doc["sft"] = {"runs": runs, "summary": {
                name: {
                    "train_tokens_per_s": median([r["train_tokens_per_s"] for r in rs]),
                    "train_tokens_per_s_runs": [round(r["train_tokens_per_s"], 1) for r in rs],
                    "cores_used": median([r.get("cores_used") for r in rs]),
                    "max_rss_mib": median([r["max_rss_mib"] for r in rs]),
                    "train_tokens_epoch": rs[0].get("train_tokens_epoch") if rs else None,
                    "loadavg_1m": [r["loadavg_before"][0] for r in rs],
                    "other_cores": [r["other_cores"] for r in rs],
                } for name, rs in runs.items()
            }}  # fmt: skip

        if args.only in (None, "generation"):
            gen_runs: dict[str, list[dict]] = {"kiln": [], "torch": []}

            def on_rep(rep: int, r: dict) -> None:
                gen_runs["kiln"].append(r)
                log(f"[{rep + 1}/{args.gen_reps}] generation kiln   greedy {fmt(r['greedy_tokens_per_s'])} tokens/s "
                    f"(tokens {r['greedy_tokens']}), prefill {fmt(r['prefill_s_median'] * 1000, 1)} ms, "
                    f"n={args.n_samples} {fmt(r.get('n4_tokens_per_s'))} tokens/s, load {r['loadavg_before'][0]:.2f}, "
                    f"other processes {r['other_cores']:.2f} cores")
                t = measure(f"generation torch [{rep + 1}]", lambda: run_torch_generation(args, model, PROMPTS))
                gen_runs["torch"].append(t)
                log(f"[{rep + 1}/{args.gen_reps}] generation torch  greedy {fmt(t['greedy_tokens_per_s'])} tokens/s "
                    f"(tokens {t['greedy_tokens']}), prefill {fmt(t['prefill_s_median'] * 1000, 1)} ms, "
                    f"n={args.n_samples} {fmt(t.get('n4_tokens_per_s'))} tokens/s, load {t['loadavg_before'][0]:.2f}, "
                    f"other processes {t['other_cores']:.2f} cores")

            bench_kiln_generation(args, tmp, model, PROMPTS, args.gen_reps, measure, on_rep)
            # Same greedy tokens? (first measured call per prompt of the first round)
            agree = []
            for i in range(len(PROMPTS)):
                k = next(x for x in gen_runs["kiln"][0]["calls"]["greedy"] if x["prompt"] == i)
                t = next(x for x in gen_runs["torch"][0]["calls"]["greedy"] if x["prompt"] == i)
                same = 0
                while same < min(len(k["text"]), len(t["text"])) and k["text"][same] == t["text"][same]:
                    same += 1
                agree.append({"prompt": i, "kiln_tokens": k["tokens"], "torch_tokens": t["tokens"],
                              "kiln_finish": k["finish_reason"], "torch_finish": t["finish_reason"],
                              "identical": k["text"] == t["text"], "common_prefix_chars": same})
            doc["generation"] = {"runs": gen_runs, "greedy_agreement": agree, "summary": {
                side: {
                    "greedy_tokens_per_s": median([r["greedy_tokens_per_s"] for r in rs]),
                    "greedy_tokens_per_s_runs": [round(r["greedy_tokens_per_s"], 1) for r in rs],
                    "decode_tokens_per_s": median([r.get("decode_tokens_per_s") for r in rs]),
                    "prefill_ms": median([r["prefill_s_median"] * 1000 for r in rs]),
                    "get_model_ms": median([r.get("get_model_ms_median") for r in rs]),
                    "n4_tokens_per_s": median([r.get("n4_tokens_per_s") for r in rs]),
                    "n4_tokens_per_s_runs": [round(r["n4_tokens_per_s"], 1) for r in rs if r.get("n4_tokens_per_s")],
                    "n4_tokens": [r.get("n4_tokens") for r in rs],
                    "loadavg_1m": [r["loadavg_before"][0] for r in rs],
                    "other_cores": [r["other_cores"] for r in rs],
                } for side, rs in gen_runs.items()
            }}  # fmt: skip
            for a in agree:
                log(f"greedy prompt {a['prompt']}: kiln {a['kiln_tokens']} tokens ({a['kiln_finish']}), torch "
                    f"{a['torch_tokens']} ({a['torch_finish']}), identical text: {a['identical']} "
                    f"(common prefix {a['common_prefix_chars']} chars)")
    except BenchError as e:
        log(f"decoder bench: error: {e}")
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    doc["loadavg_end"] = loadavg()
    ratios = {}
    print()
    print(f"Decoder: Qwen2 shape, {doc['model']['parameters']:,} parameters (hidden {args.hidden_size}, "
          f"{args.layers} layers, {args.heads}/{args.kv_heads} heads, vocab {args.vocab_size}), "
          f"{args.threads} threads" + (f", device {args.device}" if cuda else ""))
    if disturbed:
        print(f"\n{len(disturbed)} run(s) measured again because other processes used the CPU: "
              + ", ".join(f"{d['label']} ({d['other_cores']:.2f} cores)" for d in disturbed))
    if "sft" in doc:
        s = doc["sft"]["summary"]
        print()
        print(f"SFT: {args.train_examples} chat examples, batch {args.batch_size}, max_length {args.max_length}, "
              f"steps 1..{args.warmup_steps} excluded, median of {args.repeats}"
              + (f"; LoRA rank {args.lora_rank} on {args.lora_modules}" if args.strategy == "lora" else ""))
        print()
        print("| configuration | train tokens/s (runs) | cores used | peak RSS MiB | other processes, cores | kiln / this |")
        print("|---|---:|---:|---:|---|---:|")
        k = s["kiln"]["train_tokens_per_s"]
        for name, x in s.items():
            ratio = k / x["train_tokens_per_s"] if name != "kiln" and k and x["train_tokens_per_s"] else None
            if ratio is not None:
                ratios[f"sft train tokens/s: kiln / {name}"] = ratio
            print(f"| {name} | {fmt(x['train_tokens_per_s'])} ({', '.join(fmt(v) for v in x['train_tokens_per_s_runs'])}) | "
                  f"{fmt(x['cores_used'], 2)} | {fmt(x['max_rss_mib'], 0)} | "
                  f"{', '.join(fmt(v, 2) for v in x['other_cores'])} | {fmt(ratio, 2)} |")
    if "generation" in doc:
        g = doc["generation"]["summary"]
        print()
        print(f"Generation: {len(PROMPTS)} prompts x {args.gen_repeats} calls, max_tokens {args.gen_tokens}, "
              f"batch 1 greedy; n={args.n_samples}: one prompt sampled, temperature 1; median of {args.gen_reps} rounds")
        print()
        print("| figure | kiln | torch | kiln / torch |")
        print("|---|---:|---:|---:|")
        for key, label, better_high in [
            ("greedy_tokens_per_s", "greedy, tokens/s (whole call)", True),
            ("decode_tokens_per_s", "greedy, decode tokens/s (after the first token)", True),
            ("prefill_ms", "max_tokens=1 call, ms", False),
            ("n4_tokens_per_s", f"n={args.n_samples} sampled, tokens/s", True),
        ]:
            kv, tv = g["kiln"].get(key), g["torch"].get(key)
            ratio = kv / tv if kv and tv else None
            if ratio is not None:
                ratios[f"generation {label}: kiln / torch"] = ratio
            print(f"| {label} | {fmt(kv)} | {fmt(tv)} | {fmt(ratio, 2)} |")
        print()
        print(f"kiln: an authenticated GET /v1/models/{MODEL_ID} (the HTTP cost of a call) takes "
              f"{fmt(g['kiln']['get_model_ms'], 2)} ms (median)")
        for side in ("kiln", "torch"):
            x = g[side]
            print(f"{side}: greedy tokens/s per round {x['greedy_tokens_per_s_runs']}, n={args.n_samples} "
                  f"{x['n4_tokens_per_s_runs']} (tokens {x['n4_tokens']}); other processes "
                  f"{', '.join(fmt(v, 2) for v in x['other_cores'])} cores")
        for a in doc["generation"]["greedy_agreement"]:
            print(f"greedy prompt {a['prompt']}: kiln {a['kiln_tokens']} tokens ({a['kiln_finish']}), PyTorch "
                  f"{a['torch_tokens']} ({a['torch_finish']}), same text: {a['identical']}")
    lengths = doc.pop("sft_lengths", None)
    if lengths and "sft" in doc:
        gpu_name = next((r.get("device_name") for rs in doc["sft"]["runs"].values() for r in rs
                         if r.get("device_name")), None)
        if cuda and not gpu_name and doc.get("gpu"):
            gpu_name = doc["gpu"].get("name")
        lora = args.strategy == "lora"
        shape = gpu_util.decoder_shape(doc["model"]["config"], args.lora_modules.split(",") if lora else None,
                                       args.lora_rank)
        mfu = gpu_util.mfu_block(
            gpu_name if cuda else None, gpu_util.train_flops(shape, lengths, lora=lora) / sum(lengths),
            {name: x["train_tokens_per_s"] for name, x in doc["sft"]["summary"].items()}, "token",
            gpu_util.LORA_FORMULA if lora else gpu_util.FULL_FORMULA, shape, tf32_configs=("torch (best, tf32)",))
        mfu.update(strategy=args.strategy, examples=len(lengths), mean_tokens_per_example=sum(lengths) / len(lengths))
        doc["mfu"] = mfu
        gpu_util.print_mfu(mfu)
    if errors:
        doc["errors"] = errors
        print(f"\n{len(errors)} run(s) FAILED: " + "; ".join(f"{e['config']} [{e['repeat']}]" for e in errors))
    print()
    doc["ratios"] = ratios
    out = args.out or REPO / "bench/results" / f"decoder-{started:%Y-%m-%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
