#!/usr/bin/env python3
"""What Hugging Face gives for a model directory: the reference kiln's inference is compared with.

    python3 tests/python/reference_outputs.py --model-dir DIR --task classify|embed \
        --texts-json FILE [--max-length N]

FILE is a JSON list of strings. Prints ONE JSON object on stdout (everything else goes to stderr):

  classify  {"labels": [id2label in id order], "scores": [[p per label] per text],
             "logits": [[...] per text], "problem_type": ..., "prompt_tokens": [n per text]}
            AutoModelForSequenceClassification + AutoTokenizer (PreTrainedTokenizerFast over
            tokenizer.json when AutoTokenizer cannot load the directory), eval mode, float32,
            each text encoded and run on its own (no padding), truncated to --max-length when
            given. Scores: softmax, or sigmoid when config.json's problem_type is
            "multi_label_classification".

  embed     {"embeddings": [[...] per text], "pooling": "mean"|"cls"|"max"|... , "normalize": bool,
             "dimension": D, "max_seq_length": N, "prompt_tokens": [n per text],
             "pooling_modes": [...]}   (several modes are concatenated: "pooling" is "cls+mean")
            computed by sentence_transformers.SentenceTransformer(DIR, device="cpu") (which reads
            modules.json and 1_Pooling/config.json, or builds mean pooling without
            normalisation when the directory has no modules.json), one text per batch. The same
            embeddings are also computed by hand with plain transformers (AutoModel, the pooling
            config, the Normalize module) and the two must agree to 1e-5, else the script exits
            non-zero: the reference is itself checked.

Exit status: 0 on success, 2 on a bad directory / bad arguments / a disagreement, 1 on an
unexpected error. Never downloads anything (HF_HUB_OFFLINE=1).

Needs: pip install -r tests/python/requirements.txt sentence-transformers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# How far the sentence-transformers and hand-made embeddings may differ.
AGREEMENT = 1e-5
# Pooling modes the hand-made side implements (sentence-transformers' names). Several modes are
# concatenated in the order the config lists them (for the legacy boolean keys: cls, max, mean,
# mean_sqrt_len_tokens, as sentence-transformers does).
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")


class Failure(Exception):
    """A problem with the input, reported as one line without a traceback."""


def read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise Failure(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Failure(f"{what} {path} is not valid JSON: {e}") from None


def read_texts(path: str) -> list[str]:
    texts = read_json(path, "--texts-json file")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise Failure(f"--texts-json {path} must hold a JSON list of strings")
    return texts


def check_model_dir(model_dir: str) -> dict:
    """The directory's config.json, after checking the files every task needs are there."""
    if not os.path.isdir(model_dir):
        raise Failure(f"--model-dir {model_dir} is not a directory")
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise Failure(f"{model_dir} has no config.json: not a Hugging Face model directory")
    config = read_json(config_path, "config.json")
    if not isinstance(config, dict):
        raise Failure(f"{config_path} is not a JSON object")
    weights = [
        n
        for n in os.listdir(model_dir)
        if n.endswith(".safetensors") or n == "model.safetensors.index.json" or n == "pytorch_model.bin"
    ]
    if not weights:
        raise Failure(f"{model_dir} has no weights (model.safetensors or pytorch_model.bin)")
    tokenizer_files = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(model_dir, n)) for n in tokenizer_files):
        raise Failure(f"{model_dir} has no tokenizer (tokenizer.json or vocab.txt)")
    return config


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as first:  # e.g. a bare tokenizer.json without tokenizer_config.json
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise Failure(f"AutoTokenizer cannot load {model_dir} ({first}) and there is no tokenizer.json")
        try:
            return PreTrainedTokenizerFast(tokenizer_file=path)
        except Exception as e:
            raise Failure(f"cannot load the tokenizer of {model_dir}: {first}; tokenizer.json: {e}") from None


def encode(tokenizer, text: str, max_length: int | None, position_limit: int | None, model_dir: str):
    """One text as a batch of one; truncation only at max_length."""
    if max_length is not None:
        enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
    else:
        enc = tokenizer(text, return_tensors="pt", truncation=False)
    n = int(enc["input_ids"].shape[1])
    if position_limit is not None and n > position_limit:
        raise Failure(
            f"a text is {n} tokens, more than the {position_limit} positions of {model_dir}: "
            "pass --max-length to truncate"
        )
    return enc


def finite_rows(rows: list[list[float]], what: str) -> None:
    for i, row in enumerate(rows):
        if not all(math.isfinite(x) for x in row):
            raise Failure(f"{what} of text {i} are not finite: {row[:8]}...")


# ---------------------------------------------------------------------------------------------
# classify


def classify(model_dir: str, config: dict, texts: list[str], max_length: int | None) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise Failure(
            f"{model_dir} is not a sequence classifier (config.json architectures: {architectures}); "
            "transformers would add an untrained head"
        )
    problem_type = config.get("problem_type")
    if problem_type not in (None, "single_label_classification", "multi_label_classification"):
        raise Failure(f"unsupported problem_type {problem_type!r} in {model_dir}/config.json")
    multi_label = problem_type == "multi_label_classification"

    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True, output_loading_info=True
        )
    except Exception as e:
        raise Failure(f"transformers cannot load {model_dir} as a sequence classifier: {e}") from None
    missing = [k for k in info.get("missing_keys", []) if k]
    if missing:
        raise Failure(f"{model_dir} lacks weights the classifier needs (they would be random): {missing[:10]}")
    model = model.float().eval()

    num_labels = int(model.config.num_labels)
    id2label = model.config.id2label or {}
    labels = []
    for i in range(num_labels):
        label = id2label.get(i, id2label.get(str(i)))
        if label is None:
            raise Failure(f"{model_dir}/config.json id2label has no entry for id {i}")
        labels.append(str(label))

    tokenizer = load_tokenizer(model_dir)
    limit = getattr(model.config, "max_position_embeddings", None)
    logits_rows, score_rows, tokens = [], [], []
    with torch.inference_mode():
        for text in texts:
            enc = encode(tokenizer, text, max_length, limit, model_dir)
            tokens.append(int(enc["input_ids"].shape[1]))
            logits = model(**enc).logits[0].to(torch.float32)
            if logits.shape[0] != num_labels:
                raise Failure(f"the model gave {logits.shape[0]} logits for {num_labels} labels")
            scores = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
            logits_rows.append([float(x) for x in logits])
            score_rows.append([float(x) for x in scores])
    finite_rows(logits_rows, "logits")
    return {
        "labels": labels,
        "scores": score_rows,
        "logits": logits_rows,
        "problem_type": problem_type or "single_label_classification",
        "prompt_tokens": tokens,
    }


# ---------------------------------------------------------------------------------------------
# embed


def module_kind(entry: dict) -> str:
    """'Transformer', 'Pooling', 'Normalize', ... from a modules.json entry's type."""
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def pooling_setup(model_dir: str) -> tuple[list[str], bool, int | None]:
    """(pooling modes, normalise?, max_seq_length from sentence_bert_config.json) as the
    directory's sentence-transformers files say; mean pooling without normalisation when there
    are none."""
    max_seq_length = None
    sbert = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.isfile(sbert):
        value = read_json(sbert, "sentence_bert_config.json")
        if isinstance(value, dict) and value.get("max_seq_length") is not None:
            max_seq_length = int(value["max_seq_length"])

    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(modules_path):
        return ["mean"], False, max_seq_length
    modules = read_json(modules_path, "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise Failure(f"{modules_path} must be a JSON list of objects")
    kinds = [module_kind(m) for m in modules]
    unsupported = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if unsupported:
        raise Failure(f"{modules_path} has modules this reference does not implement: {unsupported}")
    if kinds.count("Transformer") != 1 or kinds[0] != "Transformer":
        raise Failure(f"{modules_path} must start with exactly one Transformer module: {kinds}")
    if kinds.count("Pooling") > 1 or kinds.count("Normalize") > 1:
        raise Failure(f"{modules_path} repeats a module: {kinds}")
    normalize = "Normalize" in kinds
    if normalize and "Pooling" in kinds and kinds.index("Normalize") < kinds.index("Pooling"):
        raise Failure(f"{modules_path} normalises before pooling: {kinds}")
    if modules[0].get("path") not in ("", None, "."):
        raise Failure(f"{modules_path}: the Transformer module must be the directory itself")
    if "Pooling" not in kinds:
        # sentence-transformers then yields token embeddings, not one vector per text.
        raise Failure(f"{modules_path} has no Pooling module")

    entry = modules[kinds.index("Pooling")]
    pooling_config = os.path.join(model_dir, str(entry.get("path") or ""), "config.json")
    if not os.path.isfile(pooling_config):
        raise Failure(f"the Pooling module's config is missing: {pooling_config}")
    cfg = read_json(pooling_config, "the Pooling config")
    if not isinstance(cfg, dict):
        raise Failure(f"{pooling_config} is not a JSON object")
    if "pooling_mode" in cfg:  # the newer sentence-transformers format
        value = cfg["pooling_mode"]
        modes = [value] if isinstance(value, str) else list(value)
    else:
        legacy = {
            "pooling_mode_cls_token": "cls",
            "pooling_mode_max_tokens": "max",
            "pooling_mode_mean_tokens": "mean",
            "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens": "weightedmean",
            "pooling_mode_lasttoken": "lasttoken",
        }
        modes = [mode for key, mode in legacy.items() if cfg.get(key)]
        if not modes:
            modes = ["mean"]  # what sentence-transformers does with no mode set
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown or not modes or len(set(modes)) != len(modes):
        raise Failure(f"{pooling_config}: pooling {modes}: each mode must be one of {list(POOLING_MODES)}, once")
    if cfg.get("include_prompt") is False:
        raise Failure(f"{pooling_config}: include_prompt=false is not supported")
    return modes, normalize, max_seq_length


def embed_by_hand(model_dir, texts, pooling, normalize, max_seq_length) -> tuple[list[list[float]], list[int]]:
    import torch
    from transformers import AutoModel

    try:
        model, info = AutoModel.from_pretrained(model_dir, local_files_only=True, output_loading_info=True)
    except Exception as e:
        raise Failure(f"transformers cannot load {model_dir} as an encoder: {e}") from None
    # A pooler missing from the checkpoint is irrelevant: only the token embeddings are used.
    missing = [k for k in info.get("missing_keys", []) if "pooler" not in k]
    if missing:
        raise Failure(f"{model_dir} lacks encoder weights (they would be random): {missing[:10]}")
    model = model.float().eval()
    tokenizer = load_tokenizer(model_dir)
    rows, tokens = [], []
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_seq_length)
            tokens.append(int(enc["input_ids"].shape[1]))
            hidden = model(**enc).last_hidden_state[0].to(torch.float32)  # (T, D)
            mask = enc["attention_mask"][0].to(torch.float32).unsqueeze(-1)  # (T, 1), all ones
            parts = []
            for mode in pooling:
                if mode == "cls":
                    parts.append(hidden[0])
                elif mode == "max":
                    parts.append(hidden.masked_fill(mask == 0, float("-inf")).max(dim=0).values)
                elif mode == "mean":
                    parts.append((hidden * mask).sum(dim=0) / mask.sum().clamp(min=1e-9))
                else:  # mean_sqrt_len_tokens
                    parts.append((hidden * mask).sum(dim=0) / mask.sum().clamp(min=1e-9).sqrt())
            vector = torch.cat(parts)
            if normalize:
                vector = vector / vector.norm(p=2).clamp(min=1e-12)  # torch.nn.functional.normalize
            rows.append([float(x) for x in vector])
    return rows, tokens


def embed(model_dir: str, config: dict, texts: list[str], max_length: int | None) -> dict:
    pooling, normalize, sbert_max = pooling_setup(model_dir)

    from sentence_transformers import SentenceTransformer

    try:
        st = SentenceTransformer(model_dir, device="cpu", local_files_only=True)
    except Exception as e:
        raise Failure(f"sentence-transformers cannot load {model_dir}: {e}") from None
    if max_length is not None:
        st.max_seq_length = max_length
    max_seq_length = st.max_seq_length
    if max_seq_length is None:
        raise Failure(f"sentence-transformers found no max_seq_length for {model_dir}: pass --max-length")
    max_seq_length = int(max_seq_length)
    # The hand-made side truncates where sentence-transformers does, from what it reads itself.
    own_max = max_length if max_length is not None else sbert_max
    if own_max is not None and own_max != max_seq_length:
        raise Failure(f"sentence-transformers truncates at {max_seq_length}, sentence_bert_config.json says {own_max}")

    if texts:
        reference = st.encode(texts, batch_size=1, convert_to_numpy=True, show_progress_bar=False)
        reference = [[float(x) for x in row] for row in reference]
    else:
        reference = []
    by_hand, tokens = embed_by_hand(model_dir, texts, pooling, normalize, max_seq_length)

    finite_rows(reference, "sentence-transformers embeddings")
    if len(reference) != len(by_hand):
        raise Failure(f"sentence-transformers gave {len(reference)} embeddings for {len(texts)} texts")
    worst = 0.0
    for i, (a, b) in enumerate(zip(reference, by_hand)):
        if len(a) != len(b):
            raise Failure(f"text {i}: sentence-transformers gives {len(a)} dimensions, by hand {len(b)}")
        worst = max([worst] + [abs(x - y) for x, y in zip(a, b)])
    if worst > AGREEMENT:
        raise Failure(
            f"sentence-transformers and the hand-made {'+'.join(pooling)} pooling (normalize={normalize}) "
            f"differ by {worst:.3e} > {AGREEMENT}: the reference cannot be trusted"
        )
    print(
        f"reference_outputs: {len(texts)} embeddings, {'+'.join(pooling)} pooling, normalize={normalize}, "
        f"max_seq_length={max_seq_length}; sentence-transformers vs by hand: max |diff| {worst:.2e}",
        file=sys.stderr,
    )
    dimension = len(reference[0]) if reference else st.get_sentence_embedding_dimension()
    return {
        "embeddings": reference,
        "pooling": "+".join(pooling),
        "pooling_modes": pooling,
        "normalize": normalize,
        "dimension": dimension,
        "max_seq_length": max_seq_length,
        "prompt_tokens": tokens,
        "max_abs_diff_by_hand": worst,
    }


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="a Hugging Face model directory")
    parser.add_argument("--task", required=True, choices=["classify", "embed"])
    parser.add_argument("--texts-json", required=True, help="a JSON file holding a list of strings")
    parser.add_argument("--max-length", type=int, default=None, help="truncate to this many tokens")
    args = parser.parse_args()

    try:
        if args.max_length is not None and args.max_length < 2:
            raise Failure("--max-length must be at least 2 (room for the special tokens)")
        texts = read_texts(args.texts_json)
        config = check_model_dir(args.model_dir)
        # Libraries may print to stdout; only the one JSON object may go there.
        with contextlib.redirect_stdout(sys.stderr):
            import torch
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
            torch.manual_seed(0)
            if args.task == "classify":
                result = classify(args.model_dir, config, texts, args.max_length)
            else:
                result = embed(args.model_dir, config, texts, args.max_length)
    except Failure as e:
        print(f"reference_outputs.py: error: {e}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print("reference_outputs.py: error: unexpected failure (traceback above)", file=sys.stderr)
        return 1
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
