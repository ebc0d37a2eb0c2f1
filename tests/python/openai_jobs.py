"""The official OpenAI Python client, with strict response validation, against kiln's
fine-tuning jobs API: upload, create, poll to succeeded, events, checkpoints, the result file,
cancel, pause/resume, list.

Run by tests/jobs_processes.rs against a real kiln server with a training engine; also
runnable by hand:
    OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=sk-kiln-... \
    KILN_TEST_MODEL=sentence-transformers/all-MiniLM-L6-v2 python3 tests/python/openai_jobs.py
"""

import json
import os
import sys
import time

import openai
from openai import OpenAI

MODEL = os.environ.get("KILN_TEST_MODEL", "kiln-test/toy-logreg")


def dataset(n: int) -> bytes:
    lines = []
    for i in range(n):
        if i % 2:
            lines.append({"text": f"wonderful lovely film {i}", "label": "pos"})
        else:
            lines.append({"text": f"awful boring mess {i}", "label": "neg"})
    return ("\n".join(json.dumps(l) for l in lines) + "\n").encode()


def wait(client: OpenAI, job_id: str, done, seconds: float = 120):
    deadline = time.time() + seconds
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if done(job):
            return job
        assert time.time() < deadline, f"job {job_id} stuck: {job}"
        time.sleep(0.2)


def main() -> None:
    client = OpenAI(
        base_url=os.environ["OPENAI_BASE_URL"],
        api_key=os.environ["OPENAI_API_KEY"],
        max_retries=0,
        _strict_response_validation=True,
    )

    train = client.files.create(file=("train.jsonl", dataset(24)), purpose="fine-tune")
    client.files.wait_for_processing(train.id, poll_interval=0.1, max_wait_seconds=30)

    # Create with the method form and kiln's knobs; every field the client requires is there.
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train.id,
        suffix="conformance",
        seed=7,
        metadata={"suite": "openai"},
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 3, "batch_size": 4, "checkpoint_every_steps": 6}
            },
        },
    )
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running"), job
    assert job.method is not None and job.method.type == "supervised", job
    assert job.hyperparameters.n_epochs == 3, job

    done = wait(client, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done
    assert done.fine_tuned_model and done.fine_tuned_model.startswith(f"ft:{MODEL}:"), done
    assert done.fine_tuned_model.endswith(f":conformance:{job.id}"), done
    assert done.finished_at is not None and len(done.result_files) == 1, done
    assert done.trained_tokens is not None, done

    # Events: the auto-paginating iterator ends and sees every step once.
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=5))
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert sorted(steps) == list(range(1, 19)), steps
    assert len({e.id for e in events}) == len(events)
    assert any("successfully completed" in e.message for e in events), events[:3]

    # Checkpoints, latest first.
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [18, 12, 6], checkpoints
    assert checkpoints[0].fine_tuned_model_checkpoint.endswith(":ckpt-step-18")
    assert checkpoints[0].metrics.train_loss is not None

    # The result file: a CSV with one row per step.
    csv = client.files.content(done.result_files[0]).read().decode()
    rows = csv.strip().splitlines()
    assert rows[0].startswith("step,epoch") and len(rows) == 19, csv

    # A second job: pause (reported as queued), resume, then cancel.
    second = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train.id,
        hyperparameters={"n_epochs": 50, "batch_size": 2},
    )
    wait(client, second.id, lambda j: j.status == "running")
    paused = client.fine_tuning.jobs.pause(second.id)
    assert paused.id == second.id
    paused = wait(client, second.id, lambda j: getattr(j, "paused", False))
    assert paused.status == "queued", paused
    resumed = client.fine_tuning.jobs.resume(second.id)
    assert resumed.status in ("queued", "running"), resumed
    wait(client, second.id, lambda j: j.status == "running")
    client.fine_tuning.jobs.cancel(second.id)
    cancelled = wait(client, second.id, lambda j: j.status == "cancelled", seconds=5)
    assert cancelled.fine_tuned_model is None, cancelled

    # List: newest first, the iterator ends.
    listed = [j.id for j in client.fine_tuning.jobs.list(limit=1)]
    assert listed == [second.id, job.id], listed
    only = [j.id for j in client.fine_tuning.jobs.list(metadata={"suite": "openai"})]
    assert only == [job.id], only

    # Errors are typed, with the field named.
    try:
        client.fine_tuning.jobs.create(model="no/such-model", training_file=train.id)
        raise AssertionError("unknown model accepted")
    except openai.BadRequestError as e:
        assert e.param == "model", e.body
    try:
        client.fine_tuning.jobs.create(
            model=MODEL, training_file=train.id, hyperparameters={"n_epochs": 0}
        )
        raise AssertionError("n_epochs 0 accepted")
    except openai.BadRequestError as e:
        assert e.param == "hyperparameters.n_epochs", e.body
    try:
        client.fine_tuning.jobs.retrieve("ftjob-missing")
        raise AssertionError("missing job found")
    except openai.NotFoundError:
        pass

    print("openai jobs conformance: ok")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        raise
