#!/usr/bin/env python3
"""Image serving benchmark: kiln's POST /v1/images/classifications vs PyTorch + transformers,
both serving the same image classifier on the same machine in the same run.

    cargo build --release --bin kiln
    python3 bench/serve_images.py                         # resnet18 and vit-tiny, ~3 min
    python3 bench/serve_images.py --models digits --levels 1,8 --seconds 5

What it does:

 1. Writes each model of --models with bench/vision.py's make_model (randomly initialised with
    transformers, seeded; resnet18 and vit-tiny at 224x224 with 4 classes, digits at 32x32 with
    10) into <tmp>/models/bench/<name>: a Hugging Face directory with preprocessor_config.json,
    the same files for both sides.
 2. Images: --images synthetic RGB PNGs at the model's input size (bench/vision.py's
    synthetic_image: stripes, a disc and noise, ~100 kB at 224x224), so preprocessing is decode,
    rescale and normalise on both sides (no resize: kiln's and PyTorch's resampling differ).
 3. Starts `kiln serve` on a new database kiln_bench_<hex> (bench/serve_minilm.py's Database and
    Server: KILN_WORKERS=0, KILN_LOG=warn). For each model and each level c of --levels: c client
    threads, each with its own keep-alive connection, POST one image per request as a JSON data
    URL ({"model": ..., "input": "data:image/png;base64,..."}) back to back for a 2 s warm-up,
    then --seconds. Counted as in serve_minilm.py: requests completed inside the window, exact
    nearest-rank p50/p99, server and client CPU, the server's batches from GET /metrics.
 4. Stops the server. PyTorch: ResNetForImageClassification / ViTForImageClassification from the
    same directory, float32, eval, torch.inference_mode, default threads. For each batch size b
    in --levels: decode b PNGs (zlib + numpy), rescale and normalise (torch), stack, forward,
    softmax, argmax, in a loop for a warm-up then --seconds: images/s, latency per call. The
    forward alone is timed too (pre-decoded batches), as a diagnostic.
 5. kiln's scores for 8 images against PyTorch's (max |diff|, warns above 1e-3); prints a table
    per model with the ratio kiln req/s over PyTorch images/s at each level, and writes every
    figure with machine information to --out (default bench/results/serve-images-<stamp>.json).

The load generator runs on the same machine as the server (base64-encoding is done before the
clock starts): on a small machine kiln's figures are the machine's capacity with a Python client
on it, not the server's alone. Everything is cleaned up even on failure or Ctrl-C. Never
downloads anything.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import serve_minilm as sm  # noqa: E402
import vision  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PATH = "/v1/images/classifications"
AGREEMENT_IMAGES = 8


def make_images(name: str, count: int, seed: int) -> list[bytes]:
    import numpy as np

    _, side, k, _ = vision.MODELS[name]
    rng = np.random.default_rng(seed)
    return [vision.png_bytes(vision.synthetic_image(rng, i % k, k, side)) for i in range(count)]


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


# ---------------------------------------------------------------------------------------------
# kiln


def measure_kiln(args, server, admin_key: str, images: dict[str, list[bytes]], report: dict) -> None:
    key = sm.project_key(server, admin_key)
    for name in args.models:
        model_id = f"bench/{name}"
        urls = [data_url(png) for png in images[name]]
        t0 = time.perf_counter()
        status, body = sm.request_json(server, key, "POST", PATH, {"model": model_id, "input": urls[0]}, timeout=600)
        first_s = time.perf_counter() - t0
        if status != 200:
            raise sm.BenchError(f"POST {PATH} ({model_id}) gave {status}: {body}")
        sm.log(f"{name}: first request (loads the model): {first_s:.2f} s")
        status, answers = sm.request_json(server, key, "POST", PATH, {"model": model_id, "input": urls[:AGREEMENT_IMAGES]})
        if status != 200:
            raise sm.BenchError(f"{AGREEMENT_IMAGES} images in one request gave {status}: {answers}")
        bodies = [json.dumps({"model": model_id, "input": u}).encode() for u in urls]
        levels = [sm.run_level(server, key, bodies, c, args.seconds, path=PATH) for c in args.levels]
        report.setdefault("kiln", {})[name] = {
            "model_id": model_id,
            "first_request_s": round(first_s, 3),
            "server_rss_mib_end": sm.proc_rss_mib(server.pid),
            "levels": levels,
            "sample_answers": answers,
        }


# ---------------------------------------------------------------------------------------------
# PyTorch


def bench_torch(args, name: str, model_dir: Path, images: list[bytes], report: dict) -> None:
    import torch

    model, _ = vision.load_torch_model(str(model_dir))
    model = model.float().eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    pre = vision.Pre(vision.MODELS[name][1])

    def classify(batch: list[bytes]):
        x = torch.stack([pre.eval(png) for png in batch])
        probs = torch.softmax(model(pixel_values=x).logits, dim=-1)
        return [labels[i] for i in probs.argmax(dim=-1).tolist()], probs

    def timed(call, seconds: float) -> list[float]:
        end = time.perf_counter() + sm.WARMUP_S
        while time.perf_counter() < end:
            call()
        latencies = []
        end = time.perf_counter() + seconds
        while (t0 := time.perf_counter()) < end:
            call()
            latencies.append(time.perf_counter() - t0)
        return latencies

    out = {"labels": labels, "num_threads": torch.get_num_threads(), "levels": []}
    with torch.inference_mode():
        answers = ((report.get("kiln") or {}).get(name) or {}).get("sample_answers")
        if isinstance(answers, dict) and answers.get("data"):
            _, probs = classify(images[: len(answers["data"])])
            worst, same = 0.0, 0
            for item, row in zip(answers["data"], probs.tolist()):
                scores = item.get("scores") or {}
                for label, p in zip(labels, row):
                    got = scores.get(label)
                    worst = max(worst, abs(float(got) - p) if isinstance(got, (int, float)) else math.inf)
                same += int(item.get("label") == labels[max(range(len(row)), key=row.__getitem__)])
            out["kiln_agreement"] = {"images": len(answers["data"]), "max_abs_score_diff": worst, "same_label": same}
            sm.log(f"{name}: kiln vs PyTorch on {len(answers['data'])} images: max |score diff| {worst:.2e}, "
                   f"same label {same}/{len(answers['data'])}")
            if not worst <= 1e-3:
                sm.log("WARNING: kiln's scores differ from PyTorch's by more than 1e-3")

        for b in args.levels:
            position = 0

            def next_batch() -> list[bytes]:
                nonlocal position
                batch = [images[(position + j) % len(images)] for j in range(b)]
                position = (position + b) % len(images)
                return batch

            cpu0, wall0 = time.process_time(), time.perf_counter()
            latencies = timed(lambda: classify(next_batch()), args.seconds)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            x = torch.stack([pre.eval(png) for png in next_batch()])
            forward = timed(lambda: model(pixel_values=x), min(args.seconds, 3.0))
            level = {
                "batch_size": b,
                "calls": len(latencies),
                "examples_per_s": round(len(latencies) * b / sum(latencies), 2),
                "latency_per_call": sm.latency_summary(latencies),
                "forward_only_ms_per_call": round(1000 * sum(forward) / len(forward), 3),
                "cores_used": round(cpu / wall, 2),
            }
            lat = level["latency_per_call"]
            sm.log(f"torch {name} b={b:<3} {level['examples_per_s']:>8.1f} img/s  p50 {lat['p50_ms']} ms per call  "
                   f"(forward alone {level['forward_only_ms_per_call']} ms)  cores {level['cores_used']}")
            out["levels"].append(level)
    report.setdefault("torch", {})[name] = out


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    now = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kiln", default=str(REPO / "target/release/kiln"), help="the kiln binary")
    p.add_argument("--models", default="resnet18,vit-tiny", help=f"comma-separated, of {','.join(vision.MODELS)}")
    p.add_argument("--images", type=int, default=64, help="distinct images per model (cycled)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level (after 2 s warm-up)")
    p.add_argument("--levels", default="1,8,32", help="concurrent clients (kiln) and batch sizes (PyTorch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / f"bench/results/serve-images-{now}.json"))
    p.add_argument("--database-url", default=os.environ.get("KILN_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--tmp-dir", default=None, help="parent of the temporary directory (default: the system's)")
    p.add_argument("--skip-torch", action="store_true", help="kiln only")
    args = p.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in vision.MODELS]
    if not args.models or unknown:
        p.error(f"--models: unknown {unknown} (choose from {', '.join(vision.MODELS)})")
    try:
        args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        p.error("--levels must be comma-separated integers")
    if not args.levels or min(args.levels) < 1:
        p.error("--levels must be positive integers")
    if args.seconds <= 0 or args.images < 1:
        p.error("--seconds and --images must be positive")
    if not os.access(args.kiln, os.X_OK):
        p.error(f"no kiln binary at {args.kiln}: cargo build --release --bin kiln (or pass --kiln)")
    return args


def main() -> int:
    args = parse_args()

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    report = {
        "benchmark": "serve_images",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": sm.machine_info(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "versions": {
            "kiln": sm.command_output([args.kiln, "--version"]),
            "git": sm.command_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO),
            "git_dirty": bool(sm.command_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO)),
        },
        "settings": {
            "models": args.models,
            "images_per_model": args.images,
            "seconds_per_level": args.seconds,
            "warmup_seconds": sm.WARMUP_S,
            "levels": args.levels,
            "kiln_request": f"POST {PATH}, one PNG per request as a data URL, keep-alive connection per client thread",
            "torch_call": "decode b PNGs + rescale/normalise + stack + forward + softmax + argmax, inference_mode, float32",
        },
    }
    cleanup: list = []
    tmp = Path(tempfile.mkdtemp(prefix="kiln-serve-images-", dir=args.tmp_dir))
    cleanup.append(("remove temporary directory", lambda: shutil.rmtree(tmp, ignore_errors=True)))
    failed = False
    try:
        images = {}
        for i, name in enumerate(args.models):
            vision.make_model(name, tmp / "models" / "bench" / name, args.seed + i)
            images[name] = make_images(name, args.images, args.seed + 100 + i)
            sm.log(f"{name}: model written, {len(images[name])} images of ~{sum(map(len, images[name])) // len(images[name]) // 1000} kB")
        sm.bench_kiln(args, tmp, cleanup, lambda server, key: measure_kiln(args, server, key, images, report))
        if not args.skip_torch:
            import torch
            import transformers

            report["versions"].update(torch=torch.__version__, transformers=transformers.__version__)
            for name in args.models:
                bench_torch(args, name, tmp / "models" / "bench" / name, images[name], report)
    except (sm.BenchError, KeyboardInterrupt, Exception) as e:
        failed = True
        if isinstance(e, sm.BenchError):
            sm.log(f"serve_images: error: {e}")
        elif isinstance(e, KeyboardInterrupt):
            sm.log(f"serve_images: interrupted ({e})")
        else:
            traceback.print_exc()
    finally:
        for what, step in reversed(cleanup):
            try:
                step()
            except Exception as e:
                sm.log(f"cleanup '{what}' failed: {e}")
    if failed:
        return 1

    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["comparison"] = {}
    for name in args.models:
        per_model = {"kiln": {"levels": report["kiln"][name]["levels"]},
                     "torch": {"levels": (report.get("torch") or {}).get(name, {}).get("levels", [])}}
        comparison = sm.compare(per_model, args.levels)
        report["comparison"][name] = comparison
        print(f"\n{name}")
        sm.print_table(comparison, input_kind="image")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nfigures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
