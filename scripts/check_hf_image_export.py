"""Checks that an image classifier exported by kiln loads in Hugging Face transformers as
AutoModelForImageClassification and gives the same logits as kiln (to 1e-4).

    python3 scripts/check_hf_image_export.py MODEL_DIR CASES.json

CASES.json: {"pixel_values": [...], "shape": [n, 3, h, w], "logits": [[...]]}: kiln's
preprocessed pixels (flattened, row-major) and the logits kiln computed from them, as written
by kiln's test (tests/train_image.rs). transformers must load the directory with no missing
or unexpected weights.
Needs: pip install torch transformers
"""

import json
import sys

import torch
from transformers import AutoModelForImageClassification


def main() -> None:
    model_dir, cases_path = sys.argv[1], sys.argv[2]
    cases = json.load(open(cases_path))
    model, info = AutoModelForImageClassification.from_pretrained(model_dir, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("num_batches_tracked")]
    unexpected = info.get("unexpected_keys", [])
    assert not missing and not unexpected, f"missing {missing}, unexpected {unexpected}"
    model.eval()
    pixels = torch.tensor(cases["pixel_values"], dtype=torch.float32).reshape(cases["shape"])
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    expected = torch.tensor(cases["logits"])
    diff = (logits - expected).abs().max().item()
    print(f"{type(model).__name__}, labels: {model.config.id2label}")
    print(f"max |transformers - kiln| = {diff:.2e} over {tuple(logits.shape)} logits")
    assert diff < 1e-4, f"logits differ by {diff}"


if __name__ == "__main__":
    main()
