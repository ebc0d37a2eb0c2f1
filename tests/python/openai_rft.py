"""The official OpenAI Python client, with strict response validation, against kiln's
reinforcement fine-tuning: graders validated and run through `fine_tuning.alpha.graders`,
then a `reinforcement` job with a `string_check` grader trains a tiny decoder until its
validation reward rises, with reward and KL reported per step.

Run by tests/openai_client.rs against a real kiln server; also runnable by hand:
    OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=sk-kiln-... \
    KILN_TEST_MODEL=kiln-test/tiny-qwen2 python3 tests/python/openai_rft.py
"""

import json
import os
import time

import openai
from openai import OpenAI

MODEL = os.environ.get("KILN_TEST_MODEL", "kiln-test/tiny-qwen2")

HAS_TARGET = {
    "type": "string_check",
    "name": "has_target",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.target }}",
    "operation": "like",
}


def lines(prompts) -> bytes:
    rows = [{"messages": [{"role": "user", "content": p}], "target": "x"} for p in prompts]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def main() -> None:
    client = OpenAI(
        base_url=os.environ["OPENAI_BASE_URL"],
        api_key=os.environ["OPENAI_API_KEY"],
        max_retries=0,
        _strict_response_validation=True,
    )
    graders = client.fine_tuning.alpha.graders

    # Validate: a usable grader comes back; a broken one is a 400 naming the field.
    assert graders.validate(grader=HAS_TARGET).grader.name == "has_target"
    try:
        graders.validate(grader={**HAS_TARGET, "operation": "contains"})
    except openai.BadRequestError as e:
        assert e.body["param"] == "grader.operation", e.body
    else:
        raise AssertionError("a bad operation was accepted")

    # Run: string_check, text_similarity, and a multi grader's formula over both.
    r = graders.run(grader=HAS_TARGET, model_sample="a box", item={"target": "x"})
    assert r.reward == 1.0 and r.metadata.type == "string_check", r
    similar = {
        "type": "text_similarity",
        "name": "close",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.answer }}",
        "evaluation_metric": "fuzzy_match",
    }
    r = graders.run(grader=similar, model_sample="abed", item={"answer": "abcd"})
    assert abs(r.reward - 0.75) < 1e-9, r
    multi = {
        "type": "multi",
        "name": "both",
        "graders": {"exact": {**HAS_TARGET, "name": "exact", "operation": "eq"}, "close": similar},
        "calculate_output": "0.5 * exact + 0.5 * close",
    }
    r = client.post(
        "/fine_tuning/alpha/graders/run",
        body={"grader": multi, "model_sample": "abed", "item": {"target": "x", "answer": "abcd"}},
        cast_to=object,
    )
    assert abs(r["reward"] - 0.375) < 1e-9 and r["sub_rewards"] == {"exact": 0.0, "close": 0.75}, r

    # Model graders ask a decoder kiln serves (here the tiny base model itself).
    judge = {
        "type": "label_model",
        "name": "judge",
        "model": MODEL,
        "input": [{"role": "user", "content": "Is this polite? {{ sample.output_text }}"}],
        "labels": ["yes", "no"],
        "passing_labels": ["yes"],
    }
    r = graders.run(grader=judge, model_sample="thank you", item={})
    assert r.reward in (0.0, 1.0) and r.metadata.type == "label_model", r
    assert r.metadata.sampled_model_name == MODEL, r
    score = {
        "type": "score_model",
        "name": "score",
        "model": MODEL,
        "input": [{"role": "user", "content": "Score 0 to 1: {{ sample.output_text }}"}],
        "range": [0, 1],
    }
    r = graders.run(grader=score, model_sample="fine", item={})
    assert 0.0 <= r.reward <= 1.0, r
    try:
        graders.run(grader={**score, "model": "no/such-model"}, model_sample="x", item={})
    except openai.NotFoundError as e:
        assert e.body["param"] == "model", e.body
    else:
        raise AssertionError("an unknown grader model was accepted")

    # A reinforcement job: the reply must contain the item's target letter.
    train = client.files.create(
        file=("rft.jsonl", lines([f"Say something {i}." for i in range(12)])), purpose="fine-tune"
    )
    valid = client.files.create(
        file=("rft_valid.jsonl", lines([f"Talk {i}." for i in range(10)])), purpose="fine-tune"
    )
    for f in (train, valid):
        client.files.wait_for_processing(f.id, poll_interval=0.1, max_wait_seconds=30)
    try:
        client.fine_tuning.jobs.create(
            model=MODEL,
            training_file=train.id,
            method={"type": "reinforcement", "reinforcement": {"grader": {**score, "model": "no/such-model"}}},
        )
    except openai.BadRequestError as e:
        assert e.body["param"] == "method.reinforcement.grader", e.body
    else:
        raise AssertionError("a job with a missing grader model was accepted")
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train.id,
        validation_file=valid.id,
        seed=3,
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": HAS_TARGET,
                "hyperparameters": {
                    "n_epochs": 12,
                    "batch_size": 4,
                    "eval_interval": 3,
                    "compute_multiplier": 2,
                    "learning_rate": 1e-2,
                    "warmup_ratio": 0.0,
                    "max_length": 72,
                },
            },
        },
    )
    assert job.method.type == "reinforcement"
    deadline = time.time() + 600
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, f"job stuck: {job}"
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job
    assert job.method.reinforcement.hyperparameters.compute_multiplier == 2

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=1000))
    metrics = [e.data for e in events if e.type == "metrics" and e.data]
    assert any("train_reward_mean" in m and "train_kl" in m for m in metrics), metrics[:3]
    rewards = [m["valid_reward"] for m in metrics if "valid_reward" in m]
    assert rewards and max(rewards) >= 0.75, rewards
    print("reinforcement conformance ok")


if __name__ == "__main__":
    main()
