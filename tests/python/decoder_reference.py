#!/usr/bin/env python3
"""What Hugging Face transformers computes for a decoder-only model directory (Llama, Qwen2,
Mistral): the reference kiln's nn::decoder is compared with (tests/nn_decoder.rs).

    python3 tests/python/decoder_reference.py CASES.json

CASES.json: a list of {"model_dir": "...", "input_ids": [[...]], "attention_mask": [[...]],
            "text": "...", "messages": [{"role": ..., "content": ...}]}

Prints ONE JSON list on stdout, an object per case:

  {"logits": [[[...] per position] per row],   AutoModelForCausalLM, float32, eval, eager
                                               attention, the given ids and mask
   "text_ids": [...],                          AutoTokenizer's ids for "text" (no special tokens
                                               added)
   "decoded": "...",                           those ids decoded back
   "chat": "...",                              apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
   "eos_token_id": ..., "pad_token_id": ...}   the tokenizer's

Exit status: 0 on success, 1 on any error. Never downloads anything (HF_HUB_OFFLINE=1).
Needs: pip install torch transformers
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def reference(case: dict) -> dict:
    model_dir = case["model_dir"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    model.float().eval()
    ids = torch.tensor(case["input_ids"])
    mask = torch.tensor(case["attention_mask"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    tok = AutoTokenizer.from_pretrained(model_dir)
    text_ids = tok.encode(case["text"], add_special_tokens=False)
    return {
        "logits": logits.tolist(),
        "text_ids": text_ids,
        "decoded": tok.decode(text_ids),
        "chat": tok.apply_chat_template(
            case["messages"], tokenize=False, add_generation_prompt=True
        ),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def main() -> None:
    cases = json.load(open(sys.argv[1]))
    json.dump([reference(case) for case in cases], sys.stdout)


if __name__ == "__main__":
    main()
