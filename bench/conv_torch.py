#!/usr/bin/env python3
"""PyTorch's side of the per-shape convolution timing (kiln's side is the ignored test
`conv_shapes_timing` in tests/nn_resnet.rs; run both on the same machine, nothing else running):

    python3 bench/conv_torch.py [--batch 16] [--threads 2]
    cargo test --release --test nn_resnet -- --ignored --nocapture conv_shapes_timing

ResNet-18's convolution shapes at 224x224 (stem, each stage's 3x3, the strided first 3x3 and
the 1x1 shortcut), channels-last (oneDNN's fast path) and float32. Forward, then backward to
the input and the weight from a gradient of ones; best of 4 for each.
"""

import argparse
import time

import torch
import torch.nn.functional as F

# name, in channels, out channels, kernel, stride, padding, input size: as in the kiln test
SHAPES = [
    ("stem", 3, 64, 7, 2, 3, 224),
    ("l1", 64, 64, 3, 1, 1, 56),
    ("l2a", 64, 128, 3, 2, 1, 56),
    ("l2", 128, 128, 3, 1, 1, 28),
    ("l2s", 64, 128, 1, 2, 0, 56),
    ("l3a", 128, 256, 3, 2, 1, 28),
    ("l3", 256, 256, 3, 1, 1, 14),
    ("l4a", 256, 512, 3, 2, 1, 14),
    ("l4", 512, 512, 3, 1, 1, 7),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), batch {args.batch}")
    for name, cin, cout, k, stride, pad, size in SHAPES:
        x = torch.randn(args.batch, cin, size, size).contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, k, k).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        w.requires_grad_()
        fwd = bwd = float("inf")
        for _ in range(4):
            t0 = time.perf_counter()
            y = F.conv2d(x, w, stride=stride, padding=pad)
            t1 = time.perf_counter()
            y.backward(torch.ones_like(y))
            t2 = time.perf_counter()
            fwd, bwd = min(fwd, t1 - t0), min(bwd, t2 - t1)
            x.grad = w.grad = None
        print(f"{name:5} fwd {fwd * 1e3:7.1f} ms  bwd {bwd * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
