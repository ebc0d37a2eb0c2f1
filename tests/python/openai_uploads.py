"""The official OpenAI Python client, with strict response validation, against kiln's Uploads API.

Run by tests/openai_client.rs against a real `kiln serve`; also runnable by hand:
    OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=sk-kiln-... python3 tests/python/openai_uploads.py
"""

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import openai
from openai import OpenAI


def dataset(n: int) -> bytes:
    lines = [json.dumps({"text": f"review number {i}", "label": "pos" if i % 2 else "neg"}) for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def main() -> None:
    client = OpenAI(
        base_url=os.environ["OPENAI_BASE_URL"],
        api_key=os.environ["OPENAI_API_KEY"],
        max_retries=0,
        _strict_response_validation=True,
    )
    data = dataset(200)

    # The client's own helper: a file on disk, cut into 1 KiB parts, MD5 checked.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_bytes(data)
        upload = client.uploads.upload_file_chunked(
            file=path,
            mime_type="text/jsonl",
            purpose="fine-tune",
            part_size=1024,
            md5=hashlib.md5(data).hexdigest(),
        )
    assert upload.object == "upload" and upload.status == "completed", upload
    assert upload.bytes == len(data) and upload.filename == "train.jsonl", upload
    assert upload.file is not None and upload.file.bytes == len(data), upload
    assert upload.expires_at - upload.created_at == 3600, upload

    # The file is an ordinary file: validated, downloadable byte for byte.
    file = client.files.wait_for_processing(upload.file.id, poll_interval=0.1, max_wait_seconds=30)
    assert file.status == "processed", file
    assert client.files.content(file.id).read() == data

    # In memory, by hand: parts sent out of order, completed in order.
    blob = dataset(30)
    pieces = [blob[:100], blob[100:700], blob[700:]]
    started = client.uploads.create(bytes=len(blob), filename="small.jsonl", mime_type="text/jsonl", purpose="batch")
    assert started.status == "pending" and started.file is None, started
    ids = {}
    for i in (2, 0, 1):
        part = client.uploads.parts.create(upload_id=started.id, data=pieces[i])
        assert part.object == "upload.part" and part.upload_id == started.id, part
        ids[i] = part.id

    # Errors are the client's typed exceptions, the field named.
    try:
        client.uploads.complete(upload_id=started.id, part_ids=[ids[0], ids[1]])
        raise AssertionError("a short completion was accepted")
    except openai.BadRequestError as e:
        assert e.param == "part_ids", e.body
    try:
        client.uploads.complete(upload_id=started.id, part_ids=[ids[0], ids[1], ids[2]], md5="0" * 32)
        raise AssertionError("a wrong md5 was accepted")
    except openai.BadRequestError as e:
        assert e.param == "md5", e.body
    try:
        client.uploads.create(bytes=10, filename="x.jsonl", mime_type="text/jsonl", purpose="nonsense")
        raise AssertionError("a bad purpose was accepted")
    except openai.BadRequestError as e:
        assert e.param == "purpose", e.body
    try:
        client.uploads.parts.create(upload_id="upload_nope", data=b"x")
        raise AssertionError("a part for a missing upload was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404

    done = client.uploads.complete(upload_id=started.id, part_ids=[ids[0], ids[1], ids[2]])
    assert done.status == "completed" and done.file is not None, done
    assert client.files.content(done.file.id).read() == blob

    # A cancelled upload takes nothing more.
    doomed = client.uploads.create(bytes=5, filename="c.bin", mime_type="application/octet-stream", purpose="batch")
    client.uploads.parts.create(upload_id=doomed.id, data=b"abc")
    cancelled = client.uploads.cancel(doomed.id)
    assert cancelled.status == "cancelled", cancelled
    try:
        client.uploads.parts.create(upload_id=doomed.id, data=b"de")
        raise AssertionError("a cancelled upload took a part")
    except openai.BadRequestError as e:
        assert e.code == "invalid_upload_state", e.body

    print("openai uploads conformance: ok")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        raise
