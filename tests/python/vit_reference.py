#!/usr/bin/env python3
"""What Hugging Face transformers computes for a ViT image-classification directory: the
reference kiln's nn::vit is compared with (tests/nn_vit.rs).

    python3 tests/python/vit_reference.py MODEL_DIR INPUT.safetensors OUTPUT.safetensors

INPUT.safetensors: "pixel_values" [batch, channels, size, size] float32, and optionally
                   "labels" [batch] int64.

OUTPUT.safetensors: "logits" [batch, num_labels] from ViTForImageClassification (float32,
                    eval mode, eager attention); with labels also "loss" (mean cross-entropy,
                    a 1-element tensor) and "grad.<name>" for every parameter, the gradient
                    of that loss, under the checkpoint's (transformers 4) tensor names.

Prints ONE JSON object on stdout: the loading info of from_pretrained
({"missing_keys": [...], "unexpected_keys": [...], "mismatched_keys": [...]}) and "labels",
the model's id2label in id order.

Exit status: 0 on success, 1 on any error. Never downloads anything (HF_HUB_OFFLINE=1).
Needs: pip install torch transformers safetensors
"""

import json
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import ViTForImageClassification  # noqa: E402


# transformers 5 renamed ViT's modules (its loader converts the checkpoint names, and
# save_pretrained writes the original ones back); gradients are reported under the checkpoint
# names, which transformers 4 also uses for its parameters.
NEW_TO_CHECKPOINT = [
    (r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


def checkpoint_name(name: str) -> str:
    for pattern, repl in NEW_TO_CHECKPOINT:
        name = re.sub(pattern, repl, name)
    return name


def main() -> None:
    model_dir, inp, out = sys.argv[1:4]
    model, info = ViTForImageClassification.from_pretrained(
        model_dir, output_loading_info=True, attn_implementation="eager"
    )
    model.float().eval()
    tensors = load_file(inp)
    pixels = tensors["pixel_values"].float()
    result = {}
    if "labels" in tensors:
        labels = tensors["labels"].long()
        output = model(pixel_values=pixels, labels=labels)
        output.loss.backward()
        result["loss"] = output.loss.detach().reshape(1)
        for name, p in model.named_parameters():
            if p.grad is not None:
                result[f"grad.{checkpoint_name(name)}"] = p.grad.detach().contiguous()
    else:
        with torch.no_grad():
            output = model(pixel_values=pixels)
    result["logits"] = output.logits.detach().contiguous()
    save_file(result, out)
    json.dump(
        {
            "missing_keys": sorted(info["missing_keys"]),
            "unexpected_keys": sorted(info["unexpected_keys"]),
            "mismatched_keys": [str(k) for k in info["mismatched_keys"]],
            "labels": [model.config.id2label[i] for i in range(model.config.num_labels)],
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
