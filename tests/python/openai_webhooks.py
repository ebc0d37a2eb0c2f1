"""The official OpenAI Python client, with strict response validation, against kiln's webhook
endpoints: create/retrieve/list/update/delete, event types, test events, secret rotation, and
real job events (a job that succeeds and one that is cancelled) received by a local HTTP server
and verified with `client.webhooks.unwrap`, the client's Standard Webhooks check.

Run by tests/openai_client.rs against a real `kiln serve` with a tiny model; also runnable by hand:
    OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=sk-kiln-... \
    KILN_TEST_MODEL=sentence-transformers/all-MiniLM-L6-v2 python3 tests/python/openai_webhooks.py
Prints "ok" at the end; exits non-zero with a message on any failure.
"""

import http.server
import json
import os
import threading
import time

import openai
from openai import OpenAI
from openai.types.webhooks import (
    FineTuningJobCancelledWebhookEvent,
    FineTuningJobSucceededWebhookEvent,
)

MODEL = os.environ.get("KILN_TEST_MODEL", "kiln-test/tiny-bert")


class Receiver:
    """A real HTTP server that records every delivery (headers and raw body)."""

    def __init__(self):
        received = self.received = []
        lock = self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with lock:
                    received.append((dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def wait_for(self, predicate, seconds=120.0):
        deadline = time.time() + seconds
        while time.time() < deadline:
            with self.lock:
                found = [r for r in self.received if predicate(r)]
            if found:
                return found[-1]
            time.sleep(0.1)
        raise AssertionError(f"no matching delivery within {seconds}s; got {self.received}")


def event_type(record) -> str:
    return json.loads(record[1])["type"]


def dataset(n: int) -> bytes:
    lines = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        text = f"wonderful lovely film {i}" if i % 2 else f"awful boring mess {i}"
        lines.append(json.dumps({"text": text, "label": label}))
    return ("\n".join(lines) + "\n").encode()


def main() -> None:
    client = OpenAI(
        base_url=os.environ["OPENAI_BASE_URL"],
        api_key=os.environ["OPENAI_API_KEY"],
        max_retries=0,
        _strict_response_validation=True,
    )
    receiver = Receiver()

    # The event types kiln sends: OpenAI's three fine-tuning events first.
    types = client.webhooks.event_types.list()
    assert types.data[:3] == [
        "fine_tuning.job.succeeded",
        "fine_tuning.job.failed",
        "fine_tuning.job.cancelled",
    ], types

    # Create: the secret is shown once, in the Standard Webhooks form.
    endpoint = client.webhooks.create(
        name="conformance",
        url=receiver.url,
        event_types=["fine_tuning.job.succeeded", "fine_tuning.job.cancelled"],
    )
    secret = endpoint.signing_secret
    assert secret.startswith("whsec_"), secret
    assert endpoint.object == "webhook_endpoint"
    assert endpoint.signing_secret_hint.endswith(secret[-4:])

    got = client.webhooks.retrieve(endpoint.id)
    assert got.url == receiver.url and got.name == "conformance"
    assert "signing_secret" not in got.to_dict()
    page = client.webhooks.list(limit=10)
    assert endpoint.id in [e.id for e in page.data]
    renamed = client.webhooks.update(endpoint.id, name="renamed")
    assert renamed.name == "renamed" and renamed.event_types == endpoint.event_types

    # A sample event, verified by the client; a wrong secret is refused.
    result = client.webhooks.test(endpoint.id, event_type="fine_tuning.job.succeeded")
    assert result.status_code == 204 and result.success, result
    record = receiver.wait_for(lambda r: json.loads(r[1])["data"].get("test"))
    event = client.webhooks.unwrap(record[1], record[0], secret=secret)
    assert isinstance(event, FineTuningJobSucceededWebhookEvent), event
    try:
        client.webhooks.unwrap(record[1], record[0], secret="whsec_" + "A" * 43 + "=")
        raise AssertionError("a wrong secret was accepted")
    except openai.InvalidWebhookSignatureError:
        pass

    # Rotation that keeps the old secret for a day: both verify the next delivery.
    rotated = client.webhooks.rotate_secret(endpoint.id, keep_old_secret_active_for_24_hours=True)
    assert rotated.signing_secret != secret and rotated.signing_secret.startswith("whsec_")
    before = len(receiver.received)
    client.webhooks.test(endpoint.id, event_type="fine_tuning.job.cancelled")
    record = receiver.wait_for(lambda r: event_type(r) == "fine_tuning.job.cancelled")
    assert len(receiver.received) == before + 1
    client.webhooks.verify_signature(record[1], record[0], secret=secret)
    client.webhooks.verify_signature(record[1], record[0], secret=rotated.signing_secret)
    secret = rotated.signing_secret

    # Bad input: a typed 400 naming the field.
    try:
        client.webhooks.create(name="x", url="ftp://example.com", event_types=["fine_tuning.job.failed"])
        raise AssertionError("an ftp URL was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "url", e.body
    try:
        client.webhooks.create(name="x", url=receiver.url, event_types=["batch.completed"])
        raise AssertionError("an event kiln never sends was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "event_types", e.body
    try:
        client.webhooks.retrieve("whep_missing")
        raise AssertionError("a missing endpoint was found")
    except openai.NotFoundError:
        pass

    # Real events: a job that trains to the end, and one cancelled.
    train = client.files.create(file=("train.jsonl", dataset(40)), purpose="fine-tune")
    client.files.wait_for_processing(train.id, poll_interval=0.1, max_wait_seconds=30)
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
    )
    record = receiver.wait_for(
        lambda r: event_type(r) == "fine_tuning.job.succeeded" and json.loads(r[1])["data"]["id"] == job.id
    )
    event = client.webhooks.unwrap(record[1], record[0], secret=secret)
    assert isinstance(event, FineTuningJobSucceededWebhookEvent), event
    assert event.data.id == job.id
    finished = client.fine_tuning.jobs.retrieve(job.id)
    assert finished.status == "succeeded"
    assert json.loads(record[1])["data"]["fine_tuned_model"] == finished.fine_tuned_model

    doomed = client.fine_tuning.jobs.create(model=MODEL, training_file=train.id)
    client.fine_tuning.jobs.cancel(doomed.id)
    record = receiver.wait_for(
        lambda r: event_type(r) == "fine_tuning.job.cancelled" and json.loads(r[1])["data"]["id"] == doomed.id
    )
    event = client.webhooks.unwrap(record[1], record[0], secret=secret)
    assert isinstance(event, FineTuningJobCancelledWebhookEvent), event

    # Every delivery carries distinct ids and the signature headers.
    ids = [headers["webhook-id"] for headers, _ in receiver.received]
    assert len(ids) == len(set(ids)), ids

    deleted = client.webhooks.delete(endpoint.id)
    assert deleted.deleted and deleted.id == endpoint.id
    try:
        client.webhooks.retrieve(endpoint.id)
        raise AssertionError("a deleted endpoint was found")
    except openai.NotFoundError:
        pass
    print("ok")


if __name__ == "__main__":
    main()
