"""Checks that a model exported by kiln loads in Hugging Face transformers as
AutoModelForSequenceClassification and gives the same logits as kiln (to 1e-4).

    python3 scripts/check_hf_export.py MODEL_DIR CASES.json

CASES.json: {"input_ids": [[...]], "attention_mask": [[...]], "token_type_ids": [[...]],
"logits": [[...]], "texts": [...]} as written by kiln's test (tests/train_cli.rs). When the
texts are given, transformers' own tokenizer must produce the same ids too.
Needs: pip install torch transformers
"""

import json
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast


def main() -> None:
    model_dir, cases_path = sys.argv[1], sys.argv[2]
    cases = json.load(open(cases_path))
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.eval()
    ids = torch.tensor(cases["input_ids"])
    mask = torch.tensor(cases["attention_mask"])
    types = torch.tensor(cases["token_type_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    expected = torch.tensor(cases["logits"])
    diff = (logits - expected).abs().max().item()
    print(f"labels: {model.config.id2label}")
    print(f"max |transformers - kiln| = {diff:.2e} over {tuple(logits.shape)} logits")
    assert diff < 1e-4, f"logits differ by {diff}"

    texts = cases.get("texts")
    if texts:
        try:
            tok = AutoTokenizer.from_pretrained(model_dir)
        except Exception:  # a bare tokenizer.json without tokenizer_config.json
            tok = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json")
        enc = tok(texts, padding=True, return_tensors="pt")
        assert enc["input_ids"].tolist() == cases["input_ids"], (enc["input_ids"].tolist(), cases["input_ids"])
        print("tokenizer: same ids")
    print("ok")


if __name__ == "__main__":
    main()
