#!/usr/bin/env python3
"""PyTorch's side of the ResNet-18 training-step timing (kiln's side is the ignored test
`resnet18_step_timing` in tests/nn_resnet.rs; run both on the same machine, nothing else
running):

    python3 bench/resnet_torch.py [--batch 8] [--size 224] [--steps 4] [--channels-last]
    cargo test --release --test nn_resnet -- --ignored --nocapture resnet18_step_timing

With --infer, the inference side instead (kiln: `resnet18_inference_timing`): eval mode,
torch.inference_mode(), batches of 1, 4 and 16, best of 6 each.

The model is transformers' ResNetForImageClassification with ResNet-18's shape (basic blocks,
hidden sizes [64, 128, 256, 512], depths [2, 2, 2, 2], stem 64), random init, 10 classes, in
training mode; one step = forward + cross-entropy + backward (no optimizer), best of the steps
after the first.
"""

import argparse
import os
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import ResNetConfig, ResNetForImageClassification  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--infer", action="store_true", help="time eval-mode inference at batch 1, 4, 16")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=64,
        hidden_sizes=[64, 128, 256, 512],
        depths=[2, 2, 2, 2],
        layer_type="basic",
        num_labels=10,
    )
    model = ResNetForImageClassification(config).train()
    if args.infer:
        model.eval()
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            for b in (1, 4, 16):
                x = torch.randn(b, 3, args.size, args.size)
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                best = float("inf")
                for _ in range(6):
                    t0 = time.perf_counter()
                    model(pixel_values=x)
                    best = min(best, time.perf_counter() - t0)
                print(f"torch ResNet-18 inference, batch {b:2}: best {best * 1e3:6.1f} ms ({b / best:5.1f} images/s)")
        return
    x = torch.randn(args.batch, 3, args.size, args.size)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(args.batch) % 10
    times = []
    for step in range(args.steps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits = model(pixel_values=x).logits
        t1 = time.perf_counter()
        F.cross_entropy(logits, y).backward()
        t2 = time.perf_counter()
        print(f"step {step}: forward {(t1 - t0) * 1e3:.0f} ms, backward {(t2 - t1) * 1e3:.0f} ms")
        times.append(t2 - t0)
    best = min(times[1:]) if len(times) > 1 else times[0]
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads) ResNet-18 train step, "
        f"batch {args.batch}, {args.size}x{args.size}: best {best * 1e3:.0f} ms "
        f"({args.batch / best:.1f} images/s)"
    )


if __name__ == "__main__":
    main()
