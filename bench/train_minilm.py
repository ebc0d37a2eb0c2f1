#!/usr/bin/env python3
"""Training and inference throughput: kiln vs PyTorch + transformers on all-MiniLM-L6-v2.

One command runs both sides on the same machine, one after the other, and prints a table:

    cargo build --release
    python3 bench/train_minilm.py --model /path/to/all-MiniLM-L6-v2

What runs (each configuration in a fresh child process, `--repeats` times, interleaved):

  kiln full        `kiln train --set strategy=full`: every weight trains.
  kiln head_only   `kiln train --set strategy=head_only`: the frozen encoder's first-token
                   features are computed once (the "feature cache"), then only the head trains.
  torch full       AutoModelForSequenceClassification, every weight trains.
  torch head_only  the same model; each step runs the frozen encoder under torch.no_grad() and
                   trains only the head (pooler dense + classifier), as a typical user would.
  kiln lora        `kiln train --set strategy=lora` with kiln's defaults: rank 8, alpha 16,
                   dropout 0.1 on query and value; the encoder frozen, the adapters (5e-4) and
                   the head (pooler dense + classifier, 1e-3) train.
  torch lora       the same model, every encoder weight frozen, query and value wrapped in
                   adapters computed as kiln's (bench/lora_torch.py: what PEFT's LoraLayer
                   computes), the same rates.

Two diagnostic configurations run too (skip them with --no-extra): "kiln full (glibc tuned)" (kiln
with GLIBC_TUNABLES that stop malloc returning freed memory to the kernel, see GLIBC_NO_RETURN) and
"torch full (fused, glibc)" (fused AdamW, glibc malloc), to tell the optimizer's share from the
allocator's. On a GPU (--device cuda) neither runs; "kiln full (candle ops)" does instead:
kiln with KILN_DEVICE_KERNELS=candle, the AdamW update, gradient norm, norms, softmax,
activations and dropout as candle ops rather than kiln's CUDA kernels, to show what those
kernels are worth.

PyTorch runs twice: "default" (torch.optim.AdamW with its defaults, glibc malloc: what a typical
user gets) and "best" (AdamW(fused=True), jemalloc via LD_PRELOAD when installed, inference
under torch.inference_mode()). kiln uses glibc malloc (it sets no global allocator).

Everything is the same on both sides: the training data (tests/data/topics-train.jsonl replicated
to --train-examples lines, in file order), the validation file, batch size 16, max_length 32 with
dynamic padding (each batch padded to its longest row, as kiln's pad_batch does), 2 threads
(RAYON_NUM_THREADS for kiln: candle's get_num_threads and gemm's rayon pool read it;
torch.set_num_threads + OMP/MKL_NUM_THREADS for PyTorch), learning rates (5e-5 backbone,
1e-3 head for full; 5e-3 head for head_only), weight decay 0.01 (not on biases/LayerNorm),
linear schedule with 10% warm-up, gradient clipping at 1.0, dropout 0.1, one optimizer step
per batch and the loss read back every step.

Timing excludes the first --warmup-steps steps on both sides: train ex/s = examples of steps
W+1..N / (time at the end of step N - time at the end of step W). For kiln the time of a step
is when its JSON `step` event arrives on stderr (--json-progress); for PyTorch it is taken in the
loop right after optimizer.step(). Evaluation, checkpoints and export happen after step N and are
not counted.

Inference ex/s is a pure encoder forward pass (no head, no gradients, eval mode) over the training
then the validation texts in batches of 64, each padded to its longest row: for kiln it is the
head_only feature cache, timed as t(step 1 event) - t(started event) - one median head-only step
(kiln's "Feature cache: ... in X s" message does not reach --json-progress, see run_kiln); for
PyTorch it is the same pass, run cold at the start of the head_only process like kiln's (a
second, warm pass is recorded in the JSON too).

Peak RSS is the child's ru_maxrss from wait4 (whole process: model, data, optimizer, runtime).

On a GPU (issue 9): --device cuda (or cuda:N) trains both sides there: kiln gets
`--device cuda:N --set mixed_precision=fp32` (its `auto` is bf16 on such GPUs), PyTorch moves the model and every batch to the GPU and synchronises before
each timer read. kiln trains in f32, so PyTorch runs in f32 with TF32 off
(torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False);
--torch-tf32 adds a "torch full (best, tf32)" configuration with TF32 on. The diagnostic
configurations (allocator tuning) are skipped on a GPU. Peak RSS is still the host process's;
PyTorch's peak GPU memory goes to the JSON. The MFU lines (full configurations only; also on the
CPU with --flops) take the training FLOPs of bench/gpu_util.py's docstring over the training
file's real token counts, against the card's dense FP32/TF32 peaks (n/a for a card not in its
table). bench/gpu.sh runs this with its GPU settings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_util  # noqa: E402
import lora_torch  # noqa: E402
JEMALLOC_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
]
EVAL_BATCH = 64  # kiln's EVAL_BATCH (src/train/classify.rs)
CLK_TCK = os.sysconf("SC_CLK_TCK")
CHILD_TIMEOUT: float | None = None  # --timeout: kill a child that runs longer (0/None: no limit)


# ---------------------------------------------------------------------------------------------
# Data


def make_data(work: Path, n_train: int) -> tuple[Path, Path]:
    """Replicates the topics training file (in order) to n_train lines; copies the validation file."""
    lines = [l for l in (REPO / "tests/data/topics-train.jsonl").read_text().splitlines() if l.strip()]
    out = [lines[i % len(lines)] for i in range(n_train)]
    train = work / "train.jsonl"
    train.write_text("\n".join(out) + "\n")
    valid = work / "valid.jsonl"
    shutil.copyfile(REPO / "tests/data/topics-valid.jsonl", valid)
    return train, valid


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def token_lengths(model: str, train: Path, max_length: int) -> list[int]:
    """Real tokens ([CLS] ... [SEP], truncated to max_length) of each training example, for the
    FLOPs of the MFU lines."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    enc = tok([r["text"] for r in read_jsonl(train)], truncation=True, max_length=max_length)
    return [len(ids) for ids in enc["input_ids"]]


# ---------------------------------------------------------------------------------------------
# Child process helpers


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


def fail(what: str, res: dict):
    tail = error_tail(res["stderr"])
    sys.exit(f"{what} failed (exit {res['rc']}):\n{tail}\n{res['stdout'][-2000:]}")


# ---------------------------------------------------------------------------------------------
# kiln side


# glibc settings that stop malloc from giving big blocks back to the kernel: no mmap for large
# allocations, no trimming of the heap top. Every freed tensor buffer is then reused instead of
# being unmapped and faulted in again (zeroed) on the next allocation.
GLIBC_NO_RETURN = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.top_pad=268435456"


def run_kiln(args, strategy: str, train: Path, valid: Path, work: Path, rep: int, tuned: bool = False,
             candle_ops: bool = False) -> dict:
    out = work / f"kiln-{strategy}-{rep}-{'tuned' if tuned else 'glibc'}{'-candle-ops' if candle_ops else ''}"
    env = dict(os.environ)
    env["RAYON_NUM_THREADS"] = str(args.threads)
    env.pop("LD_PRELOAD", None)
    env.pop("GLIBC_TUNABLES", None)
    env.pop("KILN_DEVICE_KERNELS", None)
    if tuned:
        env["GLIBC_TUNABLES"] = GLIBC_NO_RETURN
    if candle_ops:
        # The GPU's optimizer, norms, softmax, activations and dropout as candle ops, not kiln's.
        env["KILN_DEVICE_KERNELS"] = "candle"
    env.setdefault("KILN_LOG", "warn")
    cmd = [
        str(args.kiln), "train",
        "--model", str(args.model),
        "--training-file", str(train),
        "--validation-file", str(valid),
        "--output", str(out),
        "--seed", str(args.seed),
        "--json-progress",
        "--set", f"strategy={strategy}",
        "--set", f"n_epochs={args.head_epochs if strategy == 'head_only' else args.epochs}",
        "--set", f"batch_size={args.batch_size}",
        "--set", f"max_length={args.max_length}",
        *gpu_util.kiln_device_args(args.device),
    ]
    steps: dict[int, tuple[float, float | None]] = {}
    events: list[tuple[float, dict]] = []

    def on_line(t, line, pid):
        try:
            ev = json.loads(line)
        except ValueError:
            return
        if ev.get("type") == "step":
            steps[ev["step"]] = (t, cpu_seconds(pid))
        events.append((t, ev))

    res = run_child(cmd, env, on_line)
    if res["rc"] != 0:
        fail(f"kiln {strategy}", res)
    final = json.loads(res["stdout"].strip().splitlines()[-1])
    w = args.warmup_steps
    n = max(steps)
    bs = args.batch_size
    n_train = args.train_examples
    steps_per_epoch = math.ceil(n_train / bs)

    def examples_in(a: int, b: int) -> int:  # steps a+1..b
        total = 0
        for s in range(a + 1, b + 1):
            k = (s - 1) % steps_per_epoch
            total += min(bs, n_train - k * bs)
        return total

    # Only time within the first epoch: later epochs would include evaluation + checkpoint time.
    last = min(n, steps_per_epoch)
    (t_w, c_w), (t_n, c_n) = steps[w], steps[last]
    r = {
        "side": "kiln",
        "config": f"kiln {strategy}",
        "strategy": strategy,
        "steps": n,
        "timed_steps": f"{w + 1}..{last}",
        "train_ex_per_s": examples_in(w, last) / (t_n - t_w),
        "kiln_reported_ex_per_s": final.get("train_examples_per_second"),
        "train_cores_used": (c_n - c_w) / (t_n - t_w) if c_w is not None and c_n is not None else None,
        "max_rss_mib": res["max_rss_mib"],
        "wall_s": res["wall_s"],
        "cpu_s": res["cpu_s"],
        "metrics": final.get("metrics"),
        "step_s": [round(steps[s][0] - steps[s - 1][0], 4) for s in range(2, n + 1) if s in steps and s - 1 in steps],
    }
    # head_only: the feature cache is a pure encoder forward over train + valid. kiln computes it
    # right after its `started` event and before step 1. Its own "Feature cache: encoded N
    # examples once in X s" message would say how long it took, but `message` events do not
    # reach --json-progress (serde cannot write TrainEvent::Message(String) as an internally
    # tagged enum, and the CLI drops the error), so the time is taken from the event stamps:
    # t(step 1) - t(started) - one median head step.
    if strategy == "head_only":
        t_start = next(t for t, ev in events if ev.get("type") == "started")
        gaps = [steps[s][0] - steps[s - 1][0] for s in range(2, last + 1)]
        step_s = statistics.median(gaps) if gaps else 0.0
        n_ex = n_train + len(read_jsonl(valid))
        cache_s = steps[1][0] - t_start - step_s
        r.update(infer_examples=n_ex, infer_s=cache_s, infer_ex_per_s=n_ex / cache_s, head_step_s=step_s)
        for t, ev in events:  # in case a later kiln sends the message
            m = re.search(r"Feature cache: encoded (\d+) examples once in ([0-9.]+) s", json.dumps(ev))
            if m:
                r["infer_s_reported"] = float(m.group(2))
    # Evaluation after the first epoch (encoder + head over the validation file, warm) for full.
    if strategy == "full":
        ev_t = next((t for t, ev in events if ev.get("type") == "evaluated"), None)
        if ev_t is not None and steps_per_epoch in steps:
            r["eval_valid_s"] = ev_t - steps[steps_per_epoch][0]
    return r


# ---------------------------------------------------------------------------------------------
# PyTorch side (runs in a child process: `--worker torch`)


def torch_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    best = args.variant in ("best", "fused")
    dev, dinfo = gpu_util.setup_torch(torch, args.device, args.tf32)
    cuda = dev.type == "cuda"
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    train_rows = read_jsonl(Path(args.training_file))
    valid_rows = read_jsonl(Path(args.validation_file))
    labels = sorted({r["label"] for r in train_rows})
    label_id = {l: i for i, l in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(args.model)

    def encode(rows):
        enc = tok([r["text"] for r in rows], truncation=True, max_length=args.max_length)
        return [(enc["input_ids"][i], enc["token_type_ids"][i], label_id[r["label"]]) for i, r in enumerate(rows)]

    train = encode(train_rows)
    valid = encode(valid_rows)
    pad = tok.pad_token_id

    def batch(rows):
        n = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        types = torch.zeros((len(rows), n), dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (a, b, _) in enumerate(rows):
            ids[i, : len(a)] = torch.tensor(a)
            types[i, : len(b)] = torch.tensor(b)
            mask[i, : len(a)] = 1
        y = torch.tensor([r[2] for r in rows], dtype=torch.long)
        if cuda:
            return ids.to(dev), types.to(dev), mask.to(dev), y.to(dev)
        return ids, types, mask, y

    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(labels))
    if cuda:
        model.to(dev)
    bert = model.bert
    result: dict = {"side": "torch", "variant": args.variant, "strategy": args.strategy,
                    "torch": torch.__version__, "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    if cuda:
        result.update(dinfo)
    no_grad = torch.inference_mode if best else torch.no_grad

    def infer_pass() -> float:
        bert.eval()
        t0 = time.perf_counter()
        with no_grad():
            for rows in (train, valid):
                for i in range(0, len(rows), EVAL_BATCH):
                    ids, types, mask, _ = batch(rows[i : i + EVAL_BATCH])
                    h = bert(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
                    h[:, 0].clone()
        gpu_util.sync(torch, dev)
        return time.perf_counter() - t0

    if args.strategy == "head_only":
        n_inf = len(train) + len(valid)
        s = infer_pass()  # cold, like kiln's feature cache
        result.update(infer_examples=n_inf, infer_s=s, infer_ex_per_s=n_inf / s)
        s = infer_pass()
        result.update(infer_warm_ex_per_s=n_inf / s)

    # Parameters and groups as kiln builds them.
    if args.strategy == "full":
        model.train()
        named = [(n, p) for n, p in model.named_parameters()]
        head = lambda n: n.startswith("classifier") or n.startswith("bert.pooler")
        lrs = {"backbone": 5e-5, "head": 1e-3}
    elif args.strategy == "lora":
        # kiln's defaults: rank 8, alpha 16, dropout 0.1 on query and value; the head trains.
        lora_torch.add_lora(torch, bert, ["query", "value"], 8, 16.0, 0.1)
        for p in list(bert.pooler.parameters()) + list(model.classifier.parameters()):
            p.requires_grad_(True)
        model.train()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        head = lambda n: n.startswith("classifier") or n.startswith("bert.pooler")
        lrs = {"backbone": 5e-4, "head": 1e-3}
    else:
        for p in bert.embeddings.parameters():
            p.requires_grad_(False)
        for p in bert.encoder.parameters():
            p.requires_grad_(False)
        bert.embeddings.eval()
        bert.encoder.eval()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        head = lambda n: True
        lrs = {"head": 5e-3}
    groups = []
    for g in lrs:
        for decay in (True, False):
            ps = [p for n, p in named if (head(n) == (g == "head")) and (("bias" not in n and "LayerNorm" not in n) == decay)]
            if ps:
                groups.append({"params": ps, "lr": lrs[g], "weight_decay": 0.01 if decay else 0.0})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, fused=True) if best else torch.optim.AdamW(groups)
    epochs = args.epochs
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = steps_per_epoch * epochs
    warm = round(total * 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    loss_fn = torch.nn.CrossEntropyLoss()
    dropout = torch.nn.Dropout(model.config.hidden_dropout_prob)

    marks: list[tuple[float, float, int]] = []  # (time, cpu, examples) at the end of each step
    step = 0
    examples = 0
    for epoch in range(epochs):
        order = list(range(len(train)))
        random.Random(args.seed * 1000 + epoch).shuffle(order)
        for i in range(0, len(order), args.batch_size):
            rows = [train[j] for j in order[i : i + args.batch_size]]
            ids, types, mask, y = batch(rows)
            if args.strategy in ("full", "lora"):
                logits = model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
            else:
                # Frozen backbone, forward only (no_grad also for "best": inference_mode tensors
                # cannot enter the head's autograd graph).
                with torch.no_grad():
                    h = bert(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state[:, 0]
                pooled = bert.pooler.activation(bert.pooler.dense(dropout(h)))
                logits = model.classifier(dropout(pooled))
            loss = loss_fn(logits, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            step += 1
            examples += len(rows)
            gpu_util.sync(torch, dev)
            marks.append((time.perf_counter(), time.process_time(), examples))
    w = args.warmup_steps
    last = min(len(marks), steps_per_epoch)
    (t_w, c_w, e_w), (t_n, c_n, e_n) = marks[w - 1], marks[last - 1]
    result.update(
        steps=step,
        timed_steps=f"{w + 1}..{last}",
        train_ex_per_s=(e_n - e_w) / (t_n - t_w),
        train_cores_used=(c_n - c_w) / (t_n - t_w),
        step_s=[round(b[0] - a[0], 4) for a, b in zip(marks, marks[1:])],
    )
    # Accuracy on the validation file, as a sanity check that it trained.
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(valid), EVAL_BATCH):
            ids, types, mask, y = batch(valid[i : i + EVAL_BATCH])
            correct += int((model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits.argmax(-1) == y).sum())
    result["valid_accuracy"] = correct / len(valid)
    result.update(gpu_util.gpu_memory(torch, dev))
    print(json.dumps(result))


def run_torch(args, variant: str, strategy: str, train: Path, valid: Path, rep: int, tf32: bool = False) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(args.threads)
    env.pop("LD_PRELOAD", None)
    allocator = "glibc"
    if variant == "best" and not args.no_jemalloc:
        je = next((p for p in JEMALLOC_CANDIDATES if os.path.exists(p)), None)
        if je:
            env["LD_PRELOAD"] = je
            allocator = "jemalloc"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "torch",
        "--variant", variant, "--strategy", strategy,
        "--model", str(args.model), "--training-file", str(train), "--validation-file", str(valid),
        "--epochs", str(args.epochs if strategy == "full" else args.head_epochs),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--threads", str(args.threads), "--seed", str(args.seed), "--warmup-steps", str(args.warmup_steps),
    ]
    if args.device != "cpu":
        cmd += ["--device", args.device]
    if tf32:
        cmd += ["--tf32"]
    res = run_child(cmd, env)
    if res["rc"] != 0:
        fail(f"torch {variant} {strategy}" + (" tf32" if tf32 else ""), res)
    r = json.loads(res["stdout"].strip().splitlines()[-1])
    r.update(config=f"torch {strategy} ({variant}{', tf32' if tf32 else ''})", allocator=allocator,
             max_rss_mib=res["max_rss_mib"], wall_s=res["wall_s"], cpu_s=res["cpu_s"])
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="all-MiniLM-L6-v2 directory (Hugging Face layout)")
    ap.add_argument("--kiln", type=Path, default=REPO / "target/release/kiln")
    ap.add_argument("--train-examples", type=int, default=480)
    ap.add_argument("--epochs", type=int, default=1, help="epochs for full and lora (timing uses epoch 1)")
    ap.add_argument("--head-epochs", type=int, default=1, help="epochs for head_only")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps excluded from timing")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--only", default="", help="semicolon-separated subset, e.g. 'kiln full;torch full (best)'")
    ap.add_argument("--no-jemalloc", action="store_true", help="torch best keeps glibc malloc")
    ap.add_argument("--no-extra", action="store_true",
                    help="skip the diagnostic configurations 'kiln full (glibc tuned)' and 'torch full (fused, glibc)'")
    ap.add_argument("--out", type=Path, default=None, help="results JSON [bench/results/train-minilm-DATE-TIME.json]")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default) or cuda / cuda:N: both sides train there (kiln: --device cuda:N)")
    ap.add_argument("--torch-tf32", action="store_true",
                    help="on a GPU, also run 'torch full (best, tf32)': PyTorch with TF32 matmuls")
    ap.add_argument("--flops", action="store_true", help="print the FLOP/s and MFU lines on the CPU too")
    ap.add_argument("--keep-going", action="store_true",
                    help="a configuration that fails is recorded under 'errors' and the others still run")
    ap.add_argument("--timeout", type=float, default=0.0, help="kill a child process after this many seconds (0: never)")
    ap.add_argument("--worker", choices=["torch"], help=argparse.SUPPRESS)
    ap.add_argument("--tf32", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=["default", "best", "fused"], help=argparse.SUPPRESS)
    ap.add_argument("--strategy", choices=["full", "head_only", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--training-file", help=argparse.SUPPRESS)
    ap.add_argument("--validation-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device != "cpu" and not gpu_util.is_cuda(args.device):
        ap.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if args.worker == "torch":
        return torch_worker(args)
    global CHILD_TIMEOUT
    CHILD_TIMEOUT = args.timeout or None
    cuda = gpu_util.is_cuda(args.device)

    if not args.kiln.is_file():
        sys.exit(f"{args.kiln} not found: run `cargo build --release` first (or pass --kiln)")
    configs = [
        ("kiln full", lambda w, t, v, r: run_kiln(args, "full", t, v, w, r)),
        ("kiln head_only", lambda w, t, v, r: run_kiln(args, "head_only", t, v, w, r)),
        ("torch full (default)", lambda w, t, v, r: run_torch(args, "default", "full", t, v, r)),
        ("torch full (best)", lambda w, t, v, r: run_torch(args, "best", "full", t, v, r)),
        ("torch head_only (default)", lambda w, t, v, r: run_torch(args, "default", "head_only", t, v, r)),
        ("torch head_only (best)", lambda w, t, v, r: run_torch(args, "best", "head_only", t, v, r)),
        ("kiln lora", lambda w, t, v, r: run_kiln(args, "lora", t, v, w, r)),
        ("torch lora (default)", lambda w, t, v, r: run_torch(args, "default", "lora", t, v, r)),
        ("torch lora (best)", lambda w, t, v, r: run_torch(args, "best", "lora", t, v, r)),
    ]
    if cuda and args.torch_tf32:
        configs.insert(4, ("torch full (best, tf32)", lambda w, t, v, r: run_torch(args, "best", "full", t, v, r, tf32=True)))
    if cuda and not args.no_extra:
        # What kiln's CUDA kernels are worth: the same run with candle's ops in their place.
        configs.insert(1, ("kiln full (candle ops)",
                           lambda w, t, v, r: run_kiln(args, "full", t, v, w, r, candle_ops=True)))
    if not args.no_extra and not cuda:
        # Where the allocator and the optimizer account for the differences (host-side: not on a GPU).
        configs.insert(1, ("kiln full (glibc tuned)", lambda w, t, v, r: run_kiln(args, "full", t, v, w, r, tuned=True)))
        configs.insert(5, ("torch full (fused, glibc)", lambda w, t, v, r: run_torch(args, "fused", "full", t, v, r)))
    if args.only:
        want = {s.strip() for s in args.only.split(";")}
        configs = [c for c in configs if c[0] in want]
    started = dt.datetime.now()
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    errors: list[dict] = []
    lengths = None
    with tempfile.TemporaryDirectory(prefix="kiln-bench-train-") as tmp:
        work = Path(tmp)
        train, valid = make_data(work, args.train_examples)
        if cuda or args.flops:
            lengths = token_lengths(args.model, train, args.max_length)
        for rep in range(args.repeats):
            for name, fn in configs:
                la0 = loadavg()
                try:
                    r = fn(work, train, valid, rep)
                except (SystemExit, Exception) as e:
                    if not args.keep_going:
                        raise
                    msg = str(e.code) if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
                    errors.append({"config": name, "repeat": rep + 1, "error": msg[:6000]})
                    print(f"[{rep + 1}/{args.repeats}] {name:<27} FAILED (--keep-going): {msg[:3000]}",
                          file=sys.stderr, flush=True)
                    continue
                r["loadavg_before"] = la0
                r["loadavg_after"] = loadavg()
                runs[name].append(r)
                print(f"[{rep + 1}/{args.repeats}] {name:<27} train {fmt(r['train_ex_per_s'])} ex/s"
                      + (f", inference {fmt(r['infer_ex_per_s'])} ex/s" if r.get("infer_ex_per_s") else "")
                      + f", peak RSS {fmt(r['max_rss_mib'], 0)} MiB, load {la0[0]:.2f}", file=sys.stderr, flush=True)

    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "train_ex_per_s": median([r["train_ex_per_s"] for r in rs]),
            "train_ex_per_s_runs": [round(r["train_ex_per_s"], 2) for r in rs],
            "train_cores_used": median([r.get("train_cores_used") for r in rs]),
            "infer_ex_per_s": median([r.get("infer_ex_per_s") for r in rs]),
            "infer_ex_per_s_runs": [round(r["infer_ex_per_s"], 2) for r in rs if r.get("infer_ex_per_s")],
            "infer_warm_ex_per_s": median([r.get("infer_warm_ex_per_s") for r in rs]),
            "infer_s": median([r.get("infer_s") for r in rs]),
            "max_rss_mib": median([r["max_rss_mib"] for r in rs]),
            "loadavg_1m": [r["loadavg_before"][0] for r in rs],
        }

    def ratio(a, b, key):
        x, y = summary.get(a, {}).get(key), summary.get(b, {}).get(key)
        return x / y if x and y else None

    ratios = {}
    for k_name, t_name, key in [
        ("kiln full", "torch full (default)", "train_ex_per_s"),
        ("kiln full", "torch full (best)", "train_ex_per_s"),
        ("kiln full", "torch full (best, tf32)", "train_ex_per_s"),
        ("kiln head_only", "torch head_only (default)", "train_ex_per_s"),
        ("kiln head_only", "torch head_only (best)", "train_ex_per_s"),
        ("kiln head_only", "torch head_only (default)", "infer_ex_per_s"),
        ("kiln head_only", "torch head_only (best)", "infer_ex_per_s"),
        ("kiln lora", "torch lora (default)", "train_ex_per_s"),
        ("kiln lora", "torch lora (best)", "train_ex_per_s"),
        ("kiln full", "torch full (default)", "max_rss_mib"),
        ("kiln full", "torch full (best)", "max_rss_mib"),
        ("kiln full (glibc tuned)", "kiln full", "train_ex_per_s"),
        ("kiln full", "kiln full (candle ops)", "train_ex_per_s"),
        ("kiln full (glibc tuned)", "torch full (best)", "train_ex_per_s"),
        ("torch full (fused, glibc)", "torch full (default)", "train_ex_per_s"),
        ("torch full (best)", "torch full (fused, glibc)", "train_ex_per_s"),
        ("kiln head_only", "torch head_only (default)", "max_rss_mib"),
    ]:
        v = ratio(k_name, t_name, key)
        if v is not None:
            ratios[f"{key}: {k_name} / {t_name}"] = v

    # head_only end to end for E epochs: kiln = cache + E*N/loop; torch = E*N/rate.
    kh, th = summary.get("kiln head_only"), summary.get("torch head_only (best)")
    if kh and th and kh["infer_s"] and kh["train_ex_per_s"] and th["train_ex_per_s"]:
        for e in (1, 3, 10):
            n = args.train_examples * e
            ratios[f"head_only end-to-end time for {e} epoch(s): torch (best) / kiln (cache + loop)"] = (
                n / th["train_ex_per_s"]) / (kh["infer_s"] + n / kh["train_ex_per_s"])

    print()
    print(f"all-MiniLM-L6-v2, {args.train_examples} training examples, batch {args.batch_size}, "
          f"max_length {args.max_length} (dynamic padding), {args.threads} threads, "
          + (f"device {args.device}, " if cuda else "")
          + f"median of {args.repeats}; steps 1..{args.warmup_steps} excluded")
    print()
    print(f"| {'configuration':<27} | train ex/s | cores used | inference ex/s | peak RSS MiB | load (1 min) |")
    print(f"|{'-' * 29}|-----------:|-----------:|---------------:|-------------:|--------------|")
    for name, s in summary.items():
        print(f"| {name:<27} | {fmt(s['train_ex_per_s']):>10} | {fmt(s['train_cores_used'], 2):>10} | "
              f"{fmt(s['infer_ex_per_s']):>14} | {fmt(s['max_rss_mib'], 0):>12} | "
              f"{', '.join(f'{x:.2f}' for x in s['loadavg_1m'])} |")
    print()
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}")
    if kh and kh.get("infer_s"):
        print(f"  kiln head_only feature cache: {kh['infer_s']:.2f} s for "
              f"{args.train_examples} + {len(read_jsonl(REPO / 'tests/data/topics-valid.jsonl'))} examples (median)")

    gpu = gpu_util.nvidia_smi() if cuda else None
    mfu = None
    if lengths:
        gpu_name = next((r.get("device_name") for rs in runs.values() for r in rs if r.get("device_name")), None)
        if cuda and not gpu_name and gpu:
            gpu_name = gpu.get("name")
        n_labels = len({r["label"] for r in read_jsonl(REPO / "tests/data/topics-train.jsonl")})
        shape = gpu_util.bert_shape(args.model, n_labels)
        mfu = gpu_util.mfu_block(
            gpu_name if cuda else None, gpu_util.train_flops(shape, lengths) / len(lengths),
            {name: s["train_ex_per_s"] for name, s in summary.items() if "full" in name},
            "example", gpu_util.FULL_FORMULA, shape, tf32_configs=("torch full (best, tf32)",))
        mfu["mean_tokens_per_example"] = sum(lengths) / len(lengths)
        gpu_util.print_mfu(mfu)
    if errors:
        print(f"\n{len(errors)} run(s) FAILED: " + "; ".join(f"{e['config']} [{e['repeat']}]" for e in errors))

    out = args.out or REPO / "bench/results" / f"train-minilm-{started:%Y-%m-%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    git = git_output
    doc = {
        "benchmark": "train_minilm",
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": machine(),
        "git_head": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("worker", "variant", "strategy", "training_file", "validation_file", "tf32")},
        "loadavg_end": loadavg(),
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    if cuda:
        doc["gpu"] = gpu
    if mfu:
        doc["mfu"] = mfu
    if errors:
        doc["errors"] = errors
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
