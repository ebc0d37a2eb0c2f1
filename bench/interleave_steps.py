#!/usr/bin/env python3
"""Interleaved A/B of `kiln train` step times: two (or more) kiln binaries train the same
vision model in turns, so that a noisy machine's drift hits both alike.

    python3 bench/vision.py --models resnet18 --keep /tmp/vis ...   # makes /tmp/vis/resnet18
    python3 bench/interleave_steps.py --data /tmp/vis/resnet18 --rounds 3 OLD_KILN NEW_KILN

Each round runs every binary once: `kiln train --model DATA/model --training-file
DATA/train.zip --validation-file DATA/valid.zip --seed 42 --json-progress` with
strategy=full, n_epochs=1, batch_size=16, augmentation=crop_flip. A step's time is the gap
between consecutive `"type":"step"` progress lines as they arrive; the first --skip gaps are
left out (warm-up), and each run reports its median. Prints every run and the median per binary.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time


def run(kiln: str, data: str, out: str, skip: int) -> tuple[int, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        kiln, "train",
        "--model", f"{data}/model",
        "--training-file", f"{data}/train.zip",
        "--validation-file", f"{data}/valid.zip",
        "--output", out, "--seed", "42", "--json-progress",
        "--set", "strategy=full", "--set", "n_epochs=1",
        "--set", "batch_size=16", "--set", "augmentation=crop_flip",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stamps = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if '"type":"step"' in line:
            stamps.append(time.perf_counter())
    if proc.wait() != 0:
        raise SystemExit(f"{kiln} train failed ({proc.returncode})")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][skip:]
    return len(stamps), statistics.median(gaps) * 1000 if gaps else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kiln", nargs="+", help="kiln binaries to compare")
    ap.add_argument("--data", required=True, help="a model directory from bench/vision.py --keep")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip", type=int, default=2, help="step gaps left out at the start")
    args = ap.parse_args()
    medians: dict[str, list[float]] = {k: [] for k in args.kiln}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, kiln in enumerate(args.kiln):
                steps, ms = run(kiln, args.data, os.path.join(tmp, f"out{i}"), args.skip)
                medians[kiln].append(ms)
                print(f"round {r} {kiln}: {steps} steps, median step {ms:.0f} ms", flush=True)
    for kiln, ms in medians.items():
        print(f"{kiln}: {[round(m) for m in ms]} median {statistics.median(ms):.0f} ms")


if __name__ == "__main__":
    main()
