"""The official OpenAI Python client, with strict response validation, against kiln's
generative side: upload a chat dataset, fine-tune a tiny decoder on it (supervised), then
chat with the fine-tuned model (plain and streamed, n samples, stop strings, usage) and
complete text with the base model; bad requests get OpenAI-shaped errors naming the field.

Run by tests/openai_client.rs against a real kiln server; also runnable by hand:
    OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=sk-kiln-... \
    KILN_TEST_MODEL=kiln-test/tiny-qwen2 python3 tests/python/openai_chat.py
"""

import json
import os
import time

import openai
from openai import OpenAI

MODEL = os.environ.get("KILN_TEST_MODEL", "kiln-test/tiny-qwen2")

# Questions the base model cannot answer (random weights) and the replies it must learn.
PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("What colour is the sky?", "Blue."),
    ("How many legs does a cat have?", "Four."),
    ("Say hello.", "Hello!"),
]


def dataset() -> bytes:
    # Each pair three times: a training file needs at least 10 examples.
    lines = []
    for q, a in PAIRS * 3:
        lines.append(
            {
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a},
                ]
            }
        )
    return ("\n".join(json.dumps(l) for l in lines) + "\n").encode()


def ask(client: OpenAI, model: str, question: str, **kw):
    return client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": question},
        ],
        temperature=0,
        max_tokens=24,
        **kw,
    )


def main() -> None:
    client = OpenAI(
        base_url=os.environ["OPENAI_BASE_URL"],
        api_key=os.environ["OPENAI_API_KEY"],
        max_retries=0,
        _strict_response_validation=True,
    )

    # The base model knows none of the answers.
    before = [ask(client, MODEL, q).choices[0].message.content for q, _ in PAIRS]
    assert before != [a for _, a in PAIRS], before

    train = client.files.create(file=("chat.jsonl", dataset()), purpose="fine-tune")
    client.files.wait_for_processing(train.id, poll_interval=0.1, max_wait_seconds=30)
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train.id,
        suffix="chat",
        seed=3,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": 60,
                    "batch_size": 4,
                    "learning_rate": 3e-3,
                    "warmup_ratio": 0.0,
                    "weight_decay": 0.0,
                }
            },
        },
    )
    deadline = time.time() + 600
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, f"job stuck: {job}"
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job
    assert job.trained_tokens and job.trained_tokens > 0, job
    ft = job.fine_tuned_model
    assert ft and ft.startswith("ft:"), ft

    # Greedy replies are the trained answers, with usage counted.
    for q, a in PAIRS:
        r = ask(client, ft, q)
        assert r.object == "chat.completion"
        assert r.choices[0].message.content == a, (q, r.choices[0].message.content)
        assert r.choices[0].finish_reason == "stop", r
        assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # Sent at the same time, the requests decode as one batch and each still gets its answer.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(PAIRS)) as pool:
        replies = list(pool.map(lambda qa: ask(client, ft, qa[0]), PAIRS))
    assert [r.choices[0].message.content for r in replies] == [a for _, a in PAIRS], replies

    # Streamed, the chunks add up to the same answer; usage comes last when asked for.
    q, a = PAIRS[0]
    stream = ask(client, ft, q, stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == a, text
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens > 0

    # n samples, each a full answer; a stop string cuts the reply before it.
    r = ask(client, ft, q, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == a for c in r.choices), r
    r = ask(client, ft, q, stop=["r"])
    assert r.choices[0].message.content == a.split("r")[0], r
    assert r.choices[0].finish_reason == "stop"
    r = ask(client, ft, q, max_completion_tokens=2)
    assert r.choices[0].finish_reason == "length", r
    assert r.usage.completion_tokens == 2

    # Sampling is seeded: the same seed gives the same text.
    kw = dict(model=MODEL, prompt="Once upon", max_tokens=12, temperature=1.0, seed=11)
    c1 = client.completions.create(**kw)
    c2 = client.completions.create(**kw)
    assert c1.object == "text_completion"
    assert c1.choices[0].text == c2.choices[0].text
    assert c1.usage.completion_tokens <= 12
    # Streamed completion chunks carry `finish_reason: null` until the last one, as OpenAI's
    # own server sends them; the client's `Completion` type has no null there, so this one
    # call is checked without strict validation (the text must still add up).
    lenient = client.with_options()
    lenient._strict_response_validation = False
    chunks = list(lenient.completions.create(**kw, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert "".join(c.choices[0].text for c in chunks if c.choices) == c1.choices[0].text

    # Bad requests: OpenAI's error shape, the field named.
    for kwargs, param in [
        (dict(temperature=3), "temperature"),
        (dict(n=0), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(logprobs=True), "logprobs"),
    ]:
        try:
            client.chat.completions.create(
                model=ft, messages=[{"role": "user", "content": q}], **kwargs
            )
        except openai.BadRequestError as e:
            assert e.body["param"] == param, e.body
        else:
            raise AssertionError(f"{kwargs} was accepted")
    try:
        client.chat.completions.create(model=ft, messages=[])
    except openai.BadRequestError as e:
        assert e.body["param"] == "messages", e.body
    else:
        raise AssertionError("empty messages were accepted")
    try:
        client.chat.completions.create(
            model="no/such-model", messages=[{"role": "user", "content": "hi"}]
        )
    except openai.NotFoundError as e:
        assert e.body["param"] == "model", e.body
    else:
        raise AssertionError("an unknown model was accepted")
    print("chat conformance ok")


if __name__ == "__main__":
    main()
