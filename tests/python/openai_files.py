"""The official OpenAI Python client, with strict response validation, against kiln's Files API.

Run by tests/openai_client.rs against a real `kiln serve`; also runnable by hand:
    OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=sk-kiln-... python3 tests/python/openai_files.py
"""

import io
import json
import os
import sys

import openai
from openai import OpenAI


def dataset(n: int) -> bytes:
    lines = [json.dumps({"text": f"review {i}", "label": "pos" if i % 2 else "neg"}) for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def main() -> None:
    client = OpenAI(
        base_url=os.environ["OPENAI_BASE_URL"],
        api_key=os.environ["OPENAI_API_KEY"],
        max_retries=0,
        _strict_response_validation=True,
    )

    # Upload: a tuple (name, bytes) and a file object both work.
    first = client.files.create(file=("train.jsonl", dataset(20)), purpose="fine-tune")
    assert first.object == "file" and first.purpose == "fine-tune", first
    assert first.bytes == len(dataset(20)) and first.filename == "train.jsonl", first
    second = client.files.create(file=io.BytesIO(dataset(12)), purpose="fine-tune")
    uploaded = [first.id, second.id]
    for i in range(5):
        uploaded.append(client.files.create(file=(f"batch{i}.jsonl", b"{}\n"), purpose="batch").id)

    # Validation finishes in the background.
    processed = client.files.wait_for_processing(first.id, poll_interval=0.1, max_wait_seconds=30)
    assert processed.status == "processed", processed

    # Retrieve.
    got = client.files.retrieve(first.id)
    assert got.id == first.id and got.status == "processed", got

    # List: the auto-paginating iterator must end, and see every file exactly once.
    seen = [f.id for f in client.files.list(limit=2)]
    assert sorted(seen) == sorted(uploaded), (seen, uploaded)
    assert len(seen) == len(set(seen)), seen
    page = client.files.list(limit=3, order="asc")
    assert [f.id for f in page.data] == uploaded[:3], page
    assert page.has_more is True
    only_batch = [f.id for f in client.files.list(purpose="batch")]
    assert sorted(only_batch) == sorted(uploaded[2:]), only_batch

    # Download: byte for byte.
    assert client.files.content(first.id).read() == dataset(20)

    # Errors surface as the client's typed exceptions with the field named.
    try:
        client.files.create(file=("x.jsonl", dataset(10)), purpose="nonsense")
        raise AssertionError("bad purpose accepted")
    except openai.BadRequestError as e:
        assert e.param == "purpose", e.body
    try:
        client.files.retrieve("file-does-not-exist")
        raise AssertionError("missing file found")
    except openai.NotFoundError as e:
        assert e.status_code == 404

    # A dataset with a bad line is an error with its line number.
    bad = client.files.create(file=("bad.jsonl", dataset(12) + b"{oops\n"), purpose="fine-tune")
    bad = client.files.wait_for_processing(bad.id, poll_interval=0.1, max_wait_seconds=30)
    assert bad.status == "error" and "line 13" in (bad.status_details or ""), bad
    uploaded.append(bad.id)

    # Delete everything; the list is then empty.
    for file_id in uploaded:
        deleted = client.files.delete(file_id)
        assert deleted.deleted is True and deleted.id == file_id, deleted
    assert list(client.files.list()) == []

    # A wrong key is an AuthenticationError.
    try:
        OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="sk-wrong", max_retries=0).files.list()
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError:
        pass

    print("openai files conformance: ok")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        raise
