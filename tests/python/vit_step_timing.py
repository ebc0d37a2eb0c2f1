#!/usr/bin/env python3
"""PyTorch's side of tests/nn_vit.rs's step timing: forward + backward of a randomly
initialised ViTForImageClassification from a config.json, on the CPU.

    python3 tests/python/vit_step_timing.py MODEL_DIR BATCH STEPS

Prints one line: median and min milliseconds per step after one warm-up step (train mode,
eager attention and SDPA, cross-entropy over fixed labels, no optimizer).
"""

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402


def main() -> None:
    model_dir, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    config = ViTConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    size = config.image_size
    pixels = torch.rand(batch, config.num_channels, size, size) * 2 - 1
    labels = torch.arange(batch) % config.num_labels
    for attn in ["eager", "sdpa"]:
        model = ViTForImageClassification._from_config(config, attn_implementation=attn).train()
        times = []
        for i in range(steps + 1):
            t = time.perf_counter()
            model.zero_grad(set_to_none=True)
            loss = model(pixel_values=pixels, labels=labels).loss
            loss.backward()
            if i > 0:
                times.append((time.perf_counter() - t) * 1000)
        times.sort()
        print(
            f"torch ViT-tiny {size} batch {batch} forward+backward ({attn}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}): "
            f"median {times[len(times) // 2]:.0f} ms, min {times[0]:.0f} ms"
        )


if __name__ == "__main__":
    main()
