#!/usr/bin/env python3
"""Does the CUDA build work? Issue 9's items 1-4 and issue 3's item 12, checked on a GPU
machine in about two minutes, with no server and no database (the GPU machine has no
PostgreSQL): `kiln train --device cuda:0` for every model family, and `kiln predict` (the
serving engine `kiln serve` runs) on the GPU against the CPU.

    python3 bench/gpu_check.py --kiln KILN --minilm MINILM_DIR [--device cuda:0] [--out JSON]

bench/gpu.sh runs it first (KILN: a `--features cuda` build, scripts/build-cuda.sh). With
--device cpu it runs the same plumbing on the CPU (both sides of each comparison then run
there; the bf16 and out-of-memory checks are skipped), a smoke test of this script.

The checks (each bounded by --timeout seconds; a failure is recorded and the others still run):

  gradients       kiln check-device: one training forward and backward of a small random model
                  of every family (BERT, decoder, decoder with LoRA, ResNet, ViT) on the device
                  and on the CPU, from the same files: every gradient and BatchNorm statistic
                  must agree (relative 1e-3 in f32; 0.3 for the text families in bf16; the
                  GPU side goes through kiln's LayerNorm and RMSNorm kernels). Then kiln's
                  other CUDA kernels: three AdamW steps (parameters, moments, gradient
                  norms within 1e-3 of the CPU's) and seeded dropout (the CPU's mask exactly).
                  The losses below only show that training runs; this shows that it trains
                  right.
  text-f32        kiln train: all-MiniLM-L6-v2, full fine-tuning, tests/data/topics-*.jsonl,
                  1 epoch, batch 16, max_length 32, mixed_precision=fp32 (on a bf16 GPU `auto`
                  is bf16). Passes when it finishes with a finite loss that fell.
  text-bf16       the same with mixed_precision=bf16 (bf16 compute, f32 master weights and
                  optimizer state). Passes when it finishes and its per-step losses stay within
                  --bf16-tolerance (mean absolute difference) of text-f32's.
  predict-classify  kiln predict on text-f32's model, on the device and on the CPU: the largest
                  difference of any label score (passes under 1e-3).
  predict-embed   kiln predict --task embed on the MiniLM base, device against CPU: the lowest
                  cosine similarity (passes above 0.9999).
  decoder-lora    kiln train: a random Qwen2-shaped decoder (bench/decoder.py's builder, hidden
                  256, 4 layers), chat SFT with LoRA, 1 epoch (precision `auto`); then kiln
                  predict (greedy, 16 tokens) of 3 prompts on the device and the CPU. Passes
                  when training finishes and each pair of completions starts the same (float
                  rounding may break a near-tie later on; the JSON says how many are equal).
  image-resnet    kiln train: the digits ResNet (bench/vision.py's builder, BatchNorm) on 100
                  scikit-learn digits, 1 epoch; kiln predict --task image of 5 images, device
                  against CPU (largest score difference under 1e-3).
  image-vit       the same with ViT-tiny (224 x 224) on 32 synthetic images.
  oom             kiln train at a batch no GPU holds (MiniLM, 2048 texts of 512 tokens in one
                  batch): passes when it fails within the timeout with kiln's out-of-memory
                  message (which device, what to change), instead of crashing or hanging.

Writes every check's outcome, figures and the tail of kiln's output to --out (JSON) and prints
a table. Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KILN_LOG", "warn")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))


class CheckFailed(Exception):
    pass


def kiln(args, cmd: list[str]) -> tuple[str, str]:
    """Runs `kiln CMD...`; (stdout, stderr), or CheckFailed with the tail of its output."""
    try:
        r = subprocess.run([str(args.kiln), *cmd], capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"`kiln {' '.join(cmd[:2])}` did not finish within {args.timeout} s")
    if r.returncode != 0:
        raise CheckFailed(f"`kiln {' '.join(cmd[:2])}` exited with {r.returncode}:\n{r.stderr[-1500:]}")
    return r.stdout, r.stderr


def train(args, model: Path, data: Path, valid: Path | None, out: Path, sets: dict, device: str) -> dict:
    """`kiln train` with --json-progress: its summary, plus `losses` (one per step)."""
    cmd = ["train", "--model", str(model), "--training-file", str(data), "--output", str(out), "--json-progress"]
    if valid:
        cmd += ["--validation-file", str(valid)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    if device != "cpu":
        cmd += ["--device", device]
    stdout, stderr = kiln(args, cmd)
    summary = json.loads(stdout.strip().splitlines()[-1])
    losses = []
    for line in stderr.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("type") == "step":
            losses.append(ev["train_loss"])
    summary["losses"] = losses
    if summary.get("status") != "succeeded":
        raise CheckFailed(f"training did not succeed: {summary}")
    if not losses or not all(math.isfinite(x) for x in losses):
        raise CheckFailed(f"losses: {losses}")
    return summary


def predict(args, model: Path, inputs: list[str], device: str, *extra: str) -> list[dict]:
    cmd = ["predict", "--model", str(model), *extra, *inputs]
    if device != "cpu":
        cmd += ["--device", device]
    stdout, _ = kiln(args, cmd)
    rows = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    if len(rows) != len(inputs):
        raise CheckFailed(f"{len(inputs)} inputs, {len(rows)} outputs")
    return rows


def score_diff(a: list[dict], b: list[dict]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        if x["label"] != y["label"] and abs(x["score"] - y["score"]) > 1e-3:
            raise CheckFailed(f"labels differ: {x} vs {y}")
        for label, s in x["scores"].items():
            worst = max(worst, abs(s - y["scores"][label]))
    return worst


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb)


# ---------------------------------------------------------------------------------------------
# The checks: each returns its figures, or raises CheckFailed.


def check_gradients(args, work: Path, state: dict) -> dict:
    try:
        r = subprocess.run([str(args.kiln), "check-device", "--device", args.device],
                           capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"`kiln check-device` did not finish within {args.timeout} s")
    lines = r.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise CheckFailed(f"`kiln check-device` exited with {r.returncode}:\n{(r.stdout + r.stderr)[-1500:]}")
    out = {c["family"] + "-" + c["dtype"]: {k: c[k] for k in ("passed", "worst", "worst_of", "error")}
           for c in report["checks"]}
    if r.returncode != 0 or not report["passed"]:
        raise CheckFailed(f"gradients differ from the CPU's: {json.dumps(out)}\n" + "\n".join(lines[:-1]))
    return out


def check_text(args, work: Path, state: dict) -> dict:
    s = train(args, args.minilm, REPO / "tests/data/topics-train.jsonl", REPO / "tests/data/topics-valid.jsonl",
              work / "text-f32", {"strategy": "full", "n_epochs": 1, "batch_size": 16, "max_length": 32,
                                  "mixed_precision": "fp32"}, args.device)
    state["text"] = s
    losses = s["losses"]
    if not losses[-1] < losses[0]:
        raise CheckFailed(f"the loss did not fall: {losses}")
    return {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1], "metrics": s["metrics"],
            "train_examples_per_second": s["train_examples_per_second"]}


def check_bf16(args, work: Path, state: dict) -> dict:
    if "text" not in state:
        raise CheckFailed("text-f32 failed: nothing to compare with")
    s = train(args, args.minilm, REPO / "tests/data/topics-train.jsonl", REPO / "tests/data/topics-valid.jsonl",
              work / "text-bf16", {"strategy": "full", "n_epochs": 1, "batch_size": 16, "max_length": 32,
                                   "mixed_precision": "bf16"}, args.device)
    a, b = state["text"]["losses"], s["losses"]
    if len(a) != len(b):
        raise CheckFailed(f"{len(a)} f32 steps, {len(b)} bf16 steps")
    diffs = [abs(x - y) for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    out = {"mean_abs_loss_diff": mean, "max_abs_loss_diff": max(diffs), "last_loss_f32": a[-1],
           "last_loss_bf16": b[-1], "metrics": s["metrics"],
           "train_examples_per_second": s["train_examples_per_second"],
           "speedup_over_f32": s["train_examples_per_second"] / state["text"]["train_examples_per_second"]}
    if mean > args.bf16_tolerance:
        raise CheckFailed(f"bf16 losses drift from f32's: {out}")
    return out


def check_predict_classify(args, work: Path, state: dict) -> dict:
    if "text" not in state:
        raise CheckFailed("text-f32 failed: no model")
    model = Path(state["text"]["model_dir"])
    texts = [json.loads(line)["text"] for line in (REPO / "tests/data/topics-valid.jsonl").read_text().splitlines()[:24]]
    here = predict(args, model, texts, args.device)
    cpu = predict(args, model, texts, "cpu")
    diff = score_diff(here, cpu)
    if diff > 1e-3:
        raise CheckFailed(f"scores differ by {diff}")
    return {"texts": len(texts), "max_score_diff": diff}


def check_predict_embed(args, work: Path, state: dict) -> dict:
    texts = ["a short text", "the weather is cold and wet today", "kiln fine-tunes models " * 20]
    here = predict(args, args.minilm, texts, args.device, "--task", "embed", "--truncate")
    cpu = predict(args, args.minilm, texts, "cpu", "--task", "embed", "--truncate")
    low = min(cosine(a["embedding"], b["embedding"]) for a, b in zip(here, cpu))
    if low < 0.9999:
        raise CheckFailed(f"lowest cosine {low}")
    return {"texts": len(texts), "min_cosine": low}


def quietly(f, *a):
    """f(*a) with its standard output (the builders' reports) kept off this script's."""
    with contextlib.redirect_stdout(io.StringIO()):
        return f(*a)


def check_decoder(args, work: Path, state: dict) -> dict:
    import decoder

    model = work / "qwen2"
    ns = argparse.Namespace(seed=0, model_out=str(model), vocab_size=264, hidden_size=256, intermediate_size=1024,
                            layers=4, heads=4, kv_heads=2, max_positions=1024, init_std=0.1)
    quietly(decoder.model_worker, ns)
    data, _ = decoder.make_data(work, 64, 0)
    s = train(args, model, data, None, work / "decoder-lora",
              {"strategy": "lora", "n_epochs": 1, "batch_size": 8, "max_length": 256, "learning_rate": 2e-3},
              args.device)
    prompts = ["Say hello.", "What is a kiln?", "Count to three."]
    here = predict(args, Path(s["model_dir"]), prompts, args.device, "--max-tokens", "16")
    cpu = predict(args, Path(s["model_dir"]), prompts, "cpu", "--max-tokens", "16")
    same = sum(a["text"] == b["text"] for a, b in zip(here, cpu))
    out = {"steps": len(s["losses"]), "first_loss": s["losses"][0], "last_loss": s["losses"][-1],
           "hyperparameters": s.get("hyperparameters"), "same_completions": f"{same}/{len(prompts)}",
           "device": [r["text"] for r in here], "cpu": [r["text"] for r in cpu]}
    # Logits that differ by float rounding can break a near-tie late in a completion; a wrong
    # model differs from the first token (one byte each with this tokenizer).
    if any(a["text"][:4] != b["text"][:4] for a, b in zip(here, cpu)):
        raise CheckFailed(f"greedy completions differ from their start: {out}")
    return out


def image_check(args, work: Path, name: str, make_zip) -> dict:
    import vision
    import zipfile

    model = work / name
    quietly(vision.make_model, name, model, 0)
    data = work / f"{name}.zip"
    make_zip(data)
    s = train(args, model, data, None, work / f"{name}-trained",
              {"strategy": "full", "n_epochs": 1, "batch_size": 16}, args.device)
    images = []
    with zipfile.ZipFile(data) as z:
        for n in sorted(x for x in z.namelist() if x.endswith(".png"))[:5]:
            p = work / f"{name}-{len(images)}.png"
            p.write_bytes(z.read(n))
            images.append(str(p))
    here = predict(args, Path(s["model_dir"]), images, args.device, "--task", "image")
    cpu = predict(args, Path(s["model_dir"]), images, "cpu", "--task", "image")
    diff = score_diff(here, cpu)
    out = {"steps": len(s["losses"]), "first_loss": s["losses"][0], "last_loss": s["losses"][-1],
           "images": len(images), "max_score_diff": diff}
    if diff > 1e-3:
        raise CheckFailed(f"scores differ: {out}")
    return out


def check_resnet(args, work: Path, state: dict) -> dict:
    import vision

    return image_check(args, work, "digits", lambda p: vision.make_digits_zip(p, 10, 0, 0))


def check_vit(args, work: Path, state: dict) -> dict:
    import vision

    return image_check(args, work, "vit-tiny", lambda p: vision.make_synthetic_zip(p, 4, 8, 224, 0))


def check_oom(args, work: Path, state: dict) -> dict:
    rng = random.Random(0)
    words = ["kiln", "model", "fires", "clay", "glaze", "heat", "slow", "cool", "form", "shape"]
    data = work / "long.jsonl"
    with data.open("w") as f:
        for i in range(2048):
            text = " ".join(rng.choice(words) for _ in range(600))
            f.write(json.dumps({"text": text, "label": "ab"[i % 2]}) + "\n")
    cmd = ["train", "--model", str(args.minilm), "--training-file", str(data), "--output", str(work / "oom"),
           "--set", "strategy=full", "--set", "n_epochs=1", "--set", "batch_size=2048", "--set", "max_length=512",
           "--device", args.device]
    t0 = time.monotonic()
    try:
        r = subprocess.run([str(args.kiln), *cmd], capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"no answer within {args.timeout} s (a hang, or it fitted and trains)")
    tail = (r.stderr + r.stdout)[-1200:]
    out = {"exit": r.returncode, "seconds": round(time.monotonic() - t0, 1), "output": tail}
    if r.returncode == 0:
        raise CheckFailed(f"a batch of 2048 x 512 tokens trained: {out}")
    if r.returncode < 0:
        raise CheckFailed(f"killed by signal {-r.returncode}: {out}")
    if "ran out of memory" not in tail or "batch_size" not in tail:
        raise CheckFailed(f"the failure is not kiln's out-of-memory message (what to change): {out}")
    return out


CHECKS = [
    ("gradients", check_gradients, True),
    ("text-f32", check_text, True),
    ("text-bf16", check_bf16, False),
    ("predict-classify", check_predict_classify, True),
    ("predict-embed", check_predict_embed, True),
    ("decoder-lora", check_decoder, True),
    ("image-resnet", check_resnet, True),
    ("image-vit", check_vit, True),
    ("oom", check_oom, False),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kiln", type=Path, required=True, help="the kiln binary (a --features cuda build on a GPU)")
    ap.add_argument("--minilm", type=Path, required=True, help="all-MiniLM-L6-v2 in Hugging Face layout")
    ap.add_argument("--device", default="cuda:0", help="cuda:N, or cpu for a smoke test of the script")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per kiln command")
    ap.add_argument("--bf16-tolerance", type=float, default=0.05,
                    help="largest mean absolute difference of the per-step losses, bf16 against f32")
    ap.add_argument("--only", default="", help="comma-separated check names")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON [bench/results/gpu-check-DATE-TIME.json]")
    args = ap.parse_args()
    if args.device == "cuda":
        args.device = "cuda:0"
    started = dt.datetime.now()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    results = []
    state: dict = {}
    with tempfile.TemporaryDirectory(prefix="kiln-gpu-check-") as tmp:
        for name, check, on_cpu in CHECKS:
            if only and name not in only:
                continue
            if args.device == "cpu" and not on_cpu:
                results.append({"check": name, "outcome": "skipped", "why": "GPU only"})
                continue
            work = Path(tmp) / name
            work.mkdir()
            t0 = time.monotonic()
            try:
                figures = check(args, work, state)
                outcome, detail = "passed", figures
            except CheckFailed as e:
                outcome, detail = "FAILED", {"why": str(e)}
            except Exception:  # a bug in this script or a missing package: recorded, go on
                outcome, detail = "FAILED", {"why": traceback.format_exc()[-1500:]}
            seconds = round(time.monotonic() - t0, 1)
            results.append({"check": name, "outcome": outcome, "seconds": seconds, **detail})
            print(f"[{outcome:>7}] {name:<17} {seconds:6.1f} s  {json.dumps(detail)[:300]}", flush=True)
    failed = [r["check"] for r in results if r["outcome"] == "FAILED"]
    out = args.out or REPO / "bench/results" / f"gpu-check-{started:%Y-%m-%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "gpu_check", "started": started.isoformat(), "device": args.device,
                               "kiln": str(args.kiln), "results": results, "failed": failed}, indent=2) + "\n")
    print(f"gpu_check: {len(results) - len(failed)} of {len(results)} passed or skipped"
          f"{'; FAILED: ' + ', '.join(failed) if failed else ''}; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
