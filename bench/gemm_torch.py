#!/usr/bin/env python3
"""PyTorch's side of `nn::gemm`'s `linear_products_timing`: the same linear products
(forward, input gradient, weight gradient) at one and two threads, best of 5, in GFLOP/s.

    python3 bench/gemm_torch.py
    cargo test --release --lib -- --ignored --nocapture linear_products_timing
"""

import time

import torch

SHAPES = [
    ("vit qkv", 3152, 192, 576),
    ("vit proj", 3152, 192, 192),
    ("vit fc1", 3152, 192, 768),
    ("vit fc2", 3152, 768, 192),
    ("minilm qkv", 512, 384, 1152),
    ("minilm fc1", 512, 384, 1536),
    ("minilm fc2", 512, 1536, 384),
]


def best(f) -> float:
    f()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, rows, inp, out in SHAPES:
            x = torch.rand(rows, inp)
            w = torch.rand(out, inp)
            d = torch.rand(rows, out)
            y = torch.empty(rows, out)
            dx = torch.empty(rows, inp)
            dw = torch.empty(out, inp)
            fwd = best(lambda: torch.matmul(x, w.t(), out=y))
            dxt = best(lambda: torch.matmul(d, w, out=dx))
            dwt = best(lambda: torch.matmul(d.t(), x, out=dw))
            gf = 2.0 * rows * inp * out / 1e9
            print(f"threads {threads} {name:<11} [{rows}x{inp}]x[{inp}x{out}]  "
                  f"fwd {gf / fwd:6.1f}  dx {gf / dxt:6.1f}  dw {gf / dwt:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
