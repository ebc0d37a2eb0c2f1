#!/usr/bin/env python3
"""What Hugging Face transformers computes for a ResNet model directory: the reference kiln's
nn::resnet is compared with (tests/nn_resnet.rs).

    python3 tests/python/resnet_reference.py CASES.json

CASES.json: a list of {"model_dir": "...",        loaded with ResNetForImageClassification
                       "inputs": "in.safetensors", "pixels" [b, c, h, w] f32, "labels" [b] i64
                       "mode": "eval" | "train",
                       "output": "out.safetensors"}

For each case writes to "output":
  "logits"             eval: model.eval() under no_grad; train: model.train() forward
  "grad.<name>"        train only: gradient of mean cross-entropy(logits, labels) w.r.t. every
                       parameter, by its state-dict name
  "buffer.<name>"      train only: every BatchNorm running_mean/running_var after that forward
and prints ONE JSON list on stdout, an object per case:
  {"missing_keys": [...], "unexpected_keys": [...], "mismatched_keys": [...], "loss": float}
from from_pretrained(..., output_loading_info=True).

Exit status: 0 on success, 1 on any error. Never downloads anything (HF_HUB_OFFLINE=1).
Needs: pip install torch transformers
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import ResNetForImageClassification  # noqa: E402


def reference(case: dict) -> dict:
    torch.manual_seed(0)
    model, info = ResNetForImageClassification.from_pretrained(
        case["model_dir"], output_loading_info=True
    )
    model.float()
    inputs = load_file(case["inputs"])
    pixels = inputs["pixels"].float()
    labels = inputs["labels"].long()
    out = {}
    loss = None
    if case["mode"] == "train":
        model.train()
        logits = model(pixel_values=pixels).logits
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        out["logits"] = logits.detach().contiguous()
        for name, p in model.named_parameters():
            if p.grad is not None:
                out[f"grad.{name}"] = p.grad.detach().contiguous()
        for name, b in model.named_buffers():
            if name.endswith("running_mean") or name.endswith("running_var"):
                out[f"buffer.{name}"] = b.detach().float().contiguous()
        loss = loss.item()
    else:
        model.eval()
        with torch.no_grad():
            out["logits"] = model(pixel_values=pixels).logits.contiguous()
    save_file(out, case["output"])
    return {
        "missing_keys": sorted(info.get("missing_keys", [])),
        "unexpected_keys": sorted(info.get("unexpected_keys", [])),
        "mismatched_keys": [str(k) for k in info.get("mismatched_keys", [])],
        "loss": loss,
    }


def main() -> None:
    cases = json.load(open(sys.argv[1]))
    json.dump([reference(case) for case in cases], sys.stdout)


if __name__ == "__main__":
    main()
