"""The official OpenAI Python client, with strict response validation, against kiln's Models and
Embeddings APIs: list, retrieve (ids with '/' and ':'), embeddings as base64 (the client's default)
and as floats, typed errors. Deletes nothing (the Rust test does its own deletes).

Run by the Rust tests against a real `kiln serve`; also runnable by hand:
    python3 tests/python/openai_models.py --base-url http://127.0.0.1:8080 --api-key sk-kiln-... \
        --base-model sentence-transformers/all-MiniLM-L6-v2 \
        --fine-tuned-model 'ft:sentence-transformers/all-MiniLM-L6-v2:org:suffix:ftjob-...' \
        --embedding-dim 384

Every flag falls back to the environment the other conformance scripts use: OPENAI_BASE_URL (with
or without the trailing /v1), OPENAI_API_KEY, KILN_TEST_MODEL, KILN_TEST_FINE_TUNED_MODEL,
KILN_TEST_EMBEDDING_DIM. Prints "ok" at the end; exits non-zero with a message on any failure.
"""

import argparse
import base64
import json
import math
import os
import struct
import sys
from urllib.parse import unquote, urlsplit

import openai
from openai import OpenAI

INPUTS = ["a", "b b"]


def parse_args() -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="OpenAI client conformance: models and embeddings")
    parser.add_argument("--base-url", default=env("OPENAI_BASE_URL"), help="the server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--api-key", default=env("OPENAI_API_KEY"))
    parser.add_argument("--base-model", default=env("KILN_TEST_MODEL"), help="a base model id (contains '/')")
    parser.add_argument("--fine-tuned-model", default=env("KILN_TEST_FINE_TUNED_MODEL"), help="an ft:... model id")
    parser.add_argument(
        "--embedding-dim",
        type=int,
        default=int(env("KILN_TEST_EMBEDDING_DIM")) if env("KILN_TEST_EMBEDDING_DIM") else None,
        help="the base model's embedding size",
    )
    args = parser.parse_args()
    missing = [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if v is None]
    if missing:
        parser.error(f"missing {', '.join(missing)} (or their environment variables)")
    url = args.base_url.rstrip("/")
    if url.endswith("/v1"):  # OPENAI_BASE_URL style
        url = url[: -len("/v1")]
    args.base_url = url
    return args


def fields(model) -> dict:
    """Every field of a response object, kiln's extra ones included."""
    return model.to_dict()


def ft_parts(model_id: str):
    """(base, job) of an id `ft:{base}:{org}:{suffix}:{job}`, None if it has another form."""
    if not model_id.startswith("ft:"):
        return None
    parts = model_id[len("ft:") :].rsplit(":", 3)
    if len(parts) != 4:
        return None
    return parts[0], parts[3]


def check_vectors(vectors, dim: int, what: str) -> None:
    assert len(vectors) == len(INPUTS), f"{what}: {len(vectors)} embeddings for {len(INPUTS)} inputs"
    for i, v in enumerate(vectors):
        assert len(v) == dim, f"{what}: embedding {i} has {len(v)} dimensions, expected {dim}"
        assert all(isinstance(x, float) and math.isfinite(x) for x in v), f"{what}: embedding {i} not finite"
        assert any(x != 0.0 for x in v), f"{what}: embedding {i} is all zeros"


def main() -> None:
    args = parse_args()
    base, ft, dim = args.base_model, args.fine_tuned_model, args.embedding_dim
    client = OpenAI(
        base_url=f"{args.base_url}/v1",
        api_key=args.api_key,
        _strict_response_validation=True,
        max_retries=0,
    )

    # List: both ids, each a model object with kiln's fields.
    listed = {m.id: m for m in client.models.list()}
    for model_id in (base, ft):
        assert model_id in listed, f"{model_id} not in GET /v1/models: {sorted(listed)}"
        assert listed[model_id].object == "model", listed[model_id]
    base_fields, ft_fields = fields(listed[base]), fields(listed[ft])
    assert base_fields.get("kind") == "base", f"base model kind: {base_fields}"
    assert ft_fields.get("kind") in ("fine_tuned", "checkpoint"), f"fine-tuned model kind: {ft_fields}"
    parts = ft_parts(ft)
    if parts is not None:
        ft_base, ft_job = parts
        assert ft_fields.get("base") == ft_base, f"fine-tuned model's base, expected {ft_base}: {ft_fields}"
        assert ft_fields.get("job") == ft_job, f"fine-tuned model's job, expected {ft_job}: {ft_fields}"

    # Retrieve: the client puts the id in the path; '/' must arrive as one path segment.
    for model_id in (base, ft):
        raw = client.models.with_raw_response.retrieve(model_id)
        got = raw.parse()
        assert got.id == model_id and got.object == "model", got
        assert fields(got).get("kind") == fields(listed[model_id]).get("kind"), (fields(got), fields(listed[model_id]))
        sent = raw.http_request.url.raw_path.decode()
        segment = urlsplit(sent).path.rsplit("/models/", 1)[-1]
        assert unquote(segment) == model_id, f"the client sent {sent} for {model_id}"
        print(f"retrieve {model_id!r}: GET {sent}", file=sys.stderr)

    # Embeddings, the client's default: it asks for base64 and decodes little-endian float32.
    # This call uses a client WITHOUT strict validation: the strict client validates the raw body
    # against `embedding: List[float]` before its base64 post-parser runs, so with
    # _strict_response_validation=True the default call fails on any server that honours base64
    # (openai 3.57: APIResponseValidationError "data.0.embedding Input should be a valid list").
    # The body's shape is checked by hand here instead.
    lenient = OpenAI(base_url=f"{args.base_url}/v1", api_key=args.api_key, max_retries=0)
    raw = lenient.embeddings.with_raw_response.create(model=base, input=INPUTS)
    request = json.loads(raw.http_request.content)
    assert request.get("encoding_format") == "base64", f"the client did not ask for base64: {request}"
    body = raw.http_response.json()
    assert body.get("object") == "list" and body.get("model") == base, {k: body.get(k) for k in ("object", "model")}
    usage = body.get("usage") or {}
    assert all(isinstance(usage.get(k), int) for k in ("prompt_tokens", "total_tokens")), f"usage: {usage}"
    assert [d.get("index") for d in body["data"]] == list(range(len(INPUTS))), [d.get("index") for d in body["data"]]
    for d in body["data"]:
        assert d.get("object") == "embedding", {k: v for k, v in d.items() if k != "embedding"}
        assert isinstance(d["embedding"], str), f"base64 was asked for, got {type(d['embedding']).__name__}"
        packed = base64.b64decode(d["embedding"], validate=True)
        assert len(packed) == 4 * dim, f"base64 embedding is {len(packed)} bytes, expected {4 * dim}"
    decoded_by_hand = [list(struct.unpack(f"<{dim}f", base64.b64decode(d["embedding"]))) for d in body["data"]]
    as_base64 = raw.parse()
    b64_vectors = [list(d.embedding) for d in as_base64.data]
    check_vectors(b64_vectors, dim, "base64")
    assert b64_vectors == decoded_by_hand, "the client's base64 decoding differs from little-endian float32"
    assert as_base64.usage.prompt_tokens > 0, as_base64.usage
    assert as_base64.usage.total_tokens == as_base64.usage.prompt_tokens, as_base64.usage

    # The same as floats.
    as_float = client.embeddings.create(model=base, input=INPUTS, encoding_format="float")
    assert [d.index for d in as_float.data] == list(range(len(INPUTS))), as_float.data
    float_vectors = [d.embedding for d in as_float.data]
    check_vectors(float_vectors, dim, "float")
    worst = max(abs(x - y) for a, b in zip(b64_vectors, float_vectors) for x, y in zip(a, b))
    assert worst <= 1e-6, f"base64 and float embeddings differ by {worst}"
    assert as_float.usage.prompt_tokens == as_base64.usage.prompt_tokens, (as_float.usage, as_base64.usage)
    assert float_vectors[0] != float_vectors[1], "different inputs gave the same embedding"

    # A single string is one input.
    single = client.embeddings.create(model=base, input=INPUTS[1], encoding_format="float")
    assert len(single.data) == 1 and single.data[0].index == 0, single.data
    worst = max(abs(x - y) for x, y in zip(single.data[0].embedding, float_vectors[1]))
    assert worst <= 1e-5, f"'b b' alone and in a batch differ by {worst}"

    # Errors are typed.
    try:
        client.models.retrieve("no-such-org/no-such-model")
        raise AssertionError("unknown model retrieved")
    except openai.NotFoundError as e:
        assert e.status_code == 404
    try:
        client.embeddings.create(model="no-such-org/no-such-model", input=INPUTS, encoding_format="float")
        raise AssertionError("embeddings from an unknown model")
    except openai.NotFoundError as e:
        assert e.status_code == 404
    try:
        client.embeddings.create(model=base, input=[], encoding_format="float")
        raise AssertionError("empty input accepted")
    except openai.BadRequestError as e:
        assert e.param == "input", e.body

    print("ok")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    except openai.APIError as e:
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
