#!/usr/bin/env python3
"""Serving benchmark: kiln's POST /v1/classifications vs PyTorch + transformers, both serving a
fine-tuned all-MiniLM-L6-v2 topic classifier on the same machine in the same run.

    cargo build --release
    python3 bench/serve_minilm.py                      # defaults below
    python3 bench/serve_minilm.py --seconds 5 --levels 1,8

What it does:

 1. `kiln train` (head_only, 1 epoch) fine-tunes all-MiniLM-L6-v2 on tests/data/topics-train.jsonl
    (validation: tests/data/topics-valid.jsonl) into <tmp>/models/bench/minilm-topics: a Hugging
    Face BertForSequenceClassification directory with tokenizer, so both sides serve the same
    weights. (--model-dir DIR skips the training and serves DIR instead.)
 2. Creates a database kiln_bench_<hex> on the local PostgreSQL (psql; --database-url is the admin
    connection) and starts `kiln serve` with KILN_ADDR=127.0.0.1:0, KILN_MODELS_DIR=<tmp>/models,
    KILN_DATA_DIR=<tmp>/data, a random KILN_ADMIN_KEY, KILN_WORKERS=0, KILN_LOG=warn; the address
    is read from its "kiln listening on ..." stdout line. The model is `bench/minilm-topics`.
 3. kiln: for each level c in --levels, c client threads in this process, each with its own
    keep-alive connection (http.client), send one-text POST /v1/classifications requests back to
    back for a 2 s warm-up then --seconds. Counted: requests that complete inside the measured
    window; throughput = those / window seconds; latency = send to full response, per request;
    p50/p99 are exact (nearest rank). Every response must be 200 with a label (else an error).
 4. The server is stopped (SIGTERM). PyTorch: AutoModelForSequenceClassification + AutoTokenizer
    from the same directory, float32, eval, torch.inference_mode, default torch threads. For each
    batch size b in --levels: tokenize b texts (padding=True), run the model, softmax, pick the
    labels, repeatedly for a warm-up then --seconds; throughput = texts/s; latency per batch call.
 5. Prints a table, whether the targets hold (kiln's throughput above PyTorch's at every level;
    kiln's p99 under 2x its p50 at 8 clients) and writes every figure with machine information
    to --out (default bench/results/serve-<YYYY-MM-DD-HHMMSS>.json).

Texts: the `text` fields of tests/data/topics-valid.jsonl, cycled (each client starts at its own
offset). The load generator runs on the same machine as the server: on a small machine the kiln
figures are the machine's capacity with a Python client on it, not the server's alone (the
server's and the client's CPU use are recorded per level).

Everything is cleaned up (server stopped, database dropped, temporary directory removed) even on
failure or Ctrl-C. Never downloads anything (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import math
import os
import platform
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
MODEL_ID = "bench/minilm-topics"
WARMUP_S = 2.0
# Targets from the issue.
P99_OVER_P50_MAX = 2.0
P99_LEVEL = 8


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# machine


def machine_info() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "os": platform.system(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "nproc": os.cpu_count(),
        "available_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
    }


def command_output(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def proc_cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process (all threads), from /proc/PID/stat."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(latencies_s: list[float]) -> dict:
    values = sorted(latencies_s)
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    return {
        "count": len(values),
        "p50_ms": ms(percentile(values, 0.50)),
        "p90_ms": ms(percentile(values, 0.90)),
        "p99_ms": ms(percentile(values, 0.99)),
        "max_ms": ms(values[-1] if values else None),
        "mean_ms": ms(sum(values) / len(values) if values else None),
    }


def read_texts(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)["text"])
    if not texts:
        raise BenchError(f"no texts in {path}")
    return texts


# ---------------------------------------------------------------------------------------------
# kiln: training, database, server


def train_model(kiln: str, minilm: str, output: Path, work: Path, data_dir: Path) -> dict:
    cmd = [
        kiln, "train",
        "--model", minilm,
        "--training-file", str(REPO / "tests/data/topics-train.jsonl"),
        "--validation-file", str(REPO / "tests/data/topics-valid.jsonl"),
        "--output", str(output),
        "--work-dir", str(work),
        "--set", "n_epochs=1",
        "--set", "strategy=head_only",
    ]  # fmt: skip
    env = dict(os.environ, KILN_LOG="warn", KILN_DATA_DIR=str(data_dir))
    env.pop("KILN_MODELS_DIR", None)
    log(f"training: {' '.join(cmd)}")
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"kiln train failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    try:
        summary = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"kiln train printed no JSON summary:\n{proc.stdout[-2000:]}") from None
    if summary.get("status") != "succeeded":
        raise BenchError(f"kiln train did not succeed: {summary}")
    if not (output / "config.json").is_file():
        raise BenchError(f"kiln train wrote no config.json in {output}")
    log(f"trained in {seconds:.1f} s: metrics {summary.get('metrics')}")
    return {
        "command": cmd,
        "seconds": round(seconds, 2),
        "metrics": summary.get("metrics"),
        "labels": summary.get("labels"),
        "train_examples_per_second": summary.get("train_examples_per_second"),
    }


class Database:
    """A database of its own on the local PostgreSQL, via psql (as benches/files.rs does with sqlx)."""

    def __init__(self, admin_url: str):
        if shutil.which("psql") is None:
            raise BenchError("psql is needed to create the bench database")
        self.admin_url = admin_url
        self.name = f"kiln_bench_{secrets.token_hex(16)}"
        self._psql(f"CREATE DATABASE {self.name}")
        base, sep, query = admin_url.partition("?")
        prefix = base[: base.rindex("/")]
        self.url = f"{prefix}/{self.name}{sep}{query}"

    def _psql(self, sql: str) -> None:
        proc = subprocess.run(
            ["psql", self.admin_url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if proc.returncode != 0:
            raise BenchError(f"psql '{sql}' failed: {proc.stderr.strip()}")

    def drop(self) -> None:
        try:
            self._psql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        except Exception as e:  # report, never mask the bench's own outcome
            log(f"could not drop database {self.name}: {e}")


class Server:
    def __init__(self, kiln: str, env: dict, log_path: Path):
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [kiln, "serve"], env=env, stdout=subprocess.PIPE, stderr=self.log_file, start_new_session=True
        )
        self.pid = self.proc.pid
        lines: queue.Queue = queue.Queue()

        def drain() -> None:  # keep reading so the server never blocks on a full pipe
            for raw in self.proc.stdout:
                lines.put(raw.decode(errors="replace").rstrip("\n"))
            lines.put(None)

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + 90
        self.base = None
        banner = []
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            banner.append(line)
            if line.startswith("kiln listening on "):
                self.base = line[len("kiln listening on ") :].strip()
                break
        if self.base is None:
            exited = self.proc.poll()
            self.terminate()
            what = "did not print 'kiln listening on ...' within 90 s" if exited is None else f"exited with status {exited} before listening"
            raise BenchError(
                f"kiln serve {what}; stdout:\n"
                + "\n".join(banner)
                + f"\nlog:\n{self.log_tail()}"
            )
        if not self.base.startswith("http://127.0.0.1:"):
            self.terminate()
            raise BenchError(f"kiln listens on {self.base}, expected loopback")
        hostport = self.base[len("http://") :].rstrip("/")
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def terminate(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log("kiln did not exit within 30 s of SIGTERM: killing it")
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


class Connection(http.client.HTTPConnection):
    """A keep-alive connection with TCP_NODELAY (http.client does not set it), also after the
    automatic reconnect http.client does when the server closed an idle connection."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def request_json(server: Server, key: str, method: str, path: str, body=None, timeout: float = 60):
    conn = Connection(server.host, server.port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {key}"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except json.JSONDecodeError:
            return resp.status, data.decode(errors="replace")
    finally:
        conn.close()


def batch_metrics(server: Server, key: str) -> dict | None:
    """The server's own inference-batch counters from GET /metrics (Prometheus text): number of
    batches, inputs and seconds spent computing them, summed over its lifetime."""
    status, text = request_json(server, key, "GET", "/metrics")
    if status != 200 or not isinstance(text, str):
        return None
    want = {
        "kiln_serve_batch_seconds_sum": "seconds",
        "kiln_serve_batch_seconds_count": "batches",
        "kiln_serve_batch_inputs_sum": "inputs",
    }
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].split("{")[0] in want:
            name = want[parts[0].split("{")[0]]
            out[name] = out.get(name, 0.0) + float(parts[1])
    return out if len(out) == len(want) else None


# ---------------------------------------------------------------------------------------------
# kiln: load generation


def run_level(server: Server, key: str, bodies: list[bytes], clients: int, seconds: float,
              path: str = "/v1/classifications") -> dict:
    """`clients` threads, each POSTing `bodies` (JSON requests of one input each, cycled) to
    `path` back to back on its own keep-alive connection, WARMUP_S then `seconds`; counts what
    completes inside the window. A request counts when it gets 200 with a `label` in data[0]."""
    barrier = threading.Barrier(clients + 1)
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    error_count = [0]
    total_sent = [0]
    window = {}
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def client(index: int) -> None:
        mine: list[float] = []
        my_errors: list[str] = []
        my_error_count = 0
        sent = 0
        position = (index * 7) % len(bodies)
        conn = Connection(server.host, server.port, timeout=120)
        barrier.wait()
        start, end = window["start"], window["end"]
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            body = bodies[position]
            position = (position + 1) % len(bodies)
            ok, problem = False, None
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                t1 = time.perf_counter()
                if resp.status != 200:
                    problem = f"HTTP {resp.status}: {data[:300]!r}"
                else:
                    obj = json.loads(data)
                    label = obj["data"][0].get("label")
                    if isinstance(label, str) and label:
                        ok = True
                    else:
                        problem = f"no label: {data[:300]!r}"
            except Exception as e:  # connection reset, timeout, bad JSON
                t1 = time.perf_counter()
                problem = f"{type(e).__name__}: {e}"
                conn.close()
                conn = Connection(server.host, server.port, timeout=120)
            sent += 1
            if start <= t1 <= end:
                if ok:
                    mine.append(t1 - t0)
                else:
                    my_error_count += 1
                    if len(my_errors) < 3:
                        my_errors.append(problem)
        conn.close()
        with lock:
            latencies.extend(mine)
            error_count[0] += my_error_count
            errors.extend(my_errors)
            total_sent[0] += sent

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    window["start"] = time.perf_counter() + 0.05 + WARMUP_S
    window["end"] = window["start"] + seconds
    load_before = os.getloadavg()[0]
    barrier.wait()
    # CPU of the server and of this process (the client) over the measured window only.
    time.sleep(max(0.0, window["start"] - time.perf_counter()))
    server_cpu0, client_cpu0, wall0 = proc_cpu_seconds(server.pid), time.process_time(), time.perf_counter()
    batches0 = batch_metrics(server, key)
    time.sleep(max(0.0, window["end"] - time.perf_counter()))
    server_cpu1, client_cpu1, wall1 = proc_cpu_seconds(server.pid), time.process_time(), time.perf_counter()
    batches1 = batch_metrics(server, key)
    for t in threads:
        t.join(timeout=180)
    if any(t.is_alive() for t in threads):
        raise BenchError(f"clients still running 180 s after the end of level {clients}")

    level = {
        "clients": clients,
        "seconds": seconds,
        "warmup_seconds": WARMUP_S,
        "completed": len(latencies),
        "errors": error_count[0],
        "error_samples": errors[:5],
        "requests_sent_incl_warmup": total_sent[0],
        "requests_per_s": round(len(latencies) / seconds, 2),
        "latency": latency_summary(latencies),
        "server_cores_used": None
        if server_cpu0 is None or server_cpu1 is None
        else round((server_cpu1 - server_cpu0) / (wall1 - wall0), 2),
        "client_cores_used": round((client_cpu1 - client_cpu0) / (wall1 - wall0), 2),
        "server_rss_mib": proc_rss_mib(server.pid),
        "load_1min_before": round(load_before, 2),
    }
    if batches0 and batches1 and batches1["batches"] > batches0["batches"]:
        # What the model threads did in the window: how full each batch was, how long it took,
        # and the share of the window spent computing (the rest: waiting for requests).
        n = batches1["batches"] - batches0["batches"]
        busy = batches1["seconds"] - batches0["seconds"]
        level["server_batches"] = {
            "batches": int(n),
            "inputs_per_batch": round((batches1["inputs"] - batches0["inputs"]) / n, 2),
            "ms_per_batch": round(busy / n * 1000, 3),
            # Batch-seconds over the window: the inference lanes computing at once, on average
            # (up to one per serving core).
            "computing_share": round(busy / (wall1 - wall0), 3),
        }
    lat = level["latency"]
    if lat["p50_ms"]:
        level["p99_over_p50"] = round(lat["p99_ms"] / lat["p50_ms"], 3)
    log(
        f"kiln   c={clients:<3} {level['requests_per_s']:>9.1f} req/s  p50 {lat['p50_ms']} ms  "
        f"p99 {lat['p99_ms']} ms  errors {level['errors']}  server cores {level['server_cores_used']}  "
        f"client cores {level['client_cores_used']}"
    )
    if "server_batches" in level:
        b = level["server_batches"]
        log(
            f"       {b['batches']} batches, {b['inputs_per_batch']} inputs and {b['ms_per_batch']} ms each, "
            f"lanes computing {b['computing_share']:.2f} of the window on average"
        )
    return level


def bench_kiln(args, tmp: Path, cleanup: list, measure) -> None:
    """Starts `kiln serve` (args.kiln) on a new database (args.database_url) with models from
    tmp/models, calls measure(server, admin_key), then stops it; cleanup gets the undo steps."""
    db = Database(args.database_url)
    cleanup.append(("drop database", db.drop))
    admin_key = f"bench-admin-{secrets.token_hex(16)}"
    env = dict(
        os.environ,
        KILN_ADDR="127.0.0.1:0",
        KILN_MODELS_DIR=str(tmp / "models"),
        KILN_DATA_DIR=str(tmp / "data"),
        KILN_ADMIN_KEY=admin_key,
        KILN_WORKERS="0",
        KILN_LOG="warn",
        DATABASE_URL=db.url,
    )
    server = Server(args.kiln, env, tmp / "serve.log")
    stopped = [False]

    def stop() -> None:
        if not stopped[0]:
            stopped[0] = True
            code = server.terminate()
            log(f"kiln serve stopped (exit status {code})")

    cleanup.append(("stop server", stop))
    log(f"kiln serve (pid {server.pid}) listening on {server.base}")
    try:
        measure(server, admin_key)
    except Exception:
        log(f"kiln serve log (tail):\n{server.log_tail()}")
        raise
    stop()


def project_key(server: Server, admin_key: str) -> str:
    """A project key, as a real client would use; the admin key if keys cannot be made."""
    status, body = request_json(server, admin_key, "POST", "/v1/keys", {"project": "bench"})
    key = body.get("key") if status == 200 and isinstance(body, dict) else None
    if not key:
        log(f"POST /v1/keys gave {status} {str(body)[:200]}: using the admin key")
        key = admin_key
    return key


def measure_kiln(args, server: Server, admin_key: str, texts: list[str], report: dict) -> None:
    key = project_key(server, admin_key)

    # The first request loads the model: timed on its own, not part of any level.
    t0 = time.perf_counter()
    status, body = request_json(server, key, "POST", "/v1/classifications", {"model": MODEL_ID, "input": texts[0]}, timeout=600)
    first_s = time.perf_counter() - t0
    if status != 200:
        raise BenchError(f"POST /v1/classifications gave {status}: {body}")
    log(f"first request (loads the model): {first_s:.2f} s")
    # Answers for a few texts, compared with PyTorch's later.
    sample = texts[:16]
    status, answers = request_json(server, key, "POST", "/v1/classifications", {"model": MODEL_ID, "input": sample})
    if status != 200:
        raise BenchError(f"batch classification gave {status}: {answers}")
    status, model_obj = request_json(server, key, "GET", f"/v1/models/{MODEL_ID}")

    levels = []
    bodies = [json.dumps({"model": MODEL_ID, "input": t}).encode() for t in texts]
    for clients in args.levels:
        levels.append(run_level(server, key, bodies, clients, args.seconds))
    report["kiln"] = {
        "model_id": MODEL_ID,
        "model_object": model_obj if status == 200 else None,
        "first_request_s": round(first_s, 3),
        "server_rss_mib_end": proc_rss_mib(server.pid),
        "server_cpu_seconds_total": proc_cpu_seconds(server.pid),
        "levels": levels,
        "sample_answers": answers,
    }


# ---------------------------------------------------------------------------------------------
# PyTorch


def bench_torch(args, model_dir: Path, texts: list[str], report: dict) -> None:
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True)
    model = model.float().eval()
    load_s = time.perf_counter() - t0
    id2label = model.config.id2label
    labels = [id2label[i] for i in range(model.config.num_labels)]
    multi_label = getattr(model.config, "problem_type", None) == "multi_label_classification"

    def classify(batch: list[str]):
        enc = tokenizer(batch, padding=True, return_tensors="pt")
        logits = model(**enc).logits
        probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
        best = probs.argmax(dim=-1).tolist()
        return [labels[i] for i in best], probs

    levels = []
    with torch.inference_mode():
        # kiln's answers against PyTorch's, on the same texts.
        agreement = None
        answers = (report.get("kiln") or {}).get("sample_answers")
        if isinstance(answers, dict) and answers.get("data"):
            sample = texts[: len(answers["data"])]
            worst, same_label = 0.0, 0
            for i, text in enumerate(sample):  # one at a time: no padding effects
                got_labels, probs = classify([text])
                item = answers["data"][i]
                scores = item.get("scores") or {}
                for label, p in zip(labels, probs[0].tolist()):
                    got = scores.get(label)
                    diff = abs(float(got) - p) if isinstance(got, (int, float)) else math.inf
                    worst = max(worst, diff)
                same_label += int(item.get("label") == got_labels[0])
            agreement = {"texts": len(sample), "max_abs_score_diff": worst, "same_label": same_label}
            log(f"kiln vs PyTorch on {len(sample)} texts: max |score diff| {worst:.2e}, same label {same_label}/{len(sample)}")
            if not worst <= 1e-3:
                log("WARNING: kiln's scores differ from PyTorch's by more than 1e-3")

        for batch_size in args.levels:
            position = 0

            def next_batch() -> list[str]:
                nonlocal position
                batch = [texts[(position + j) % len(texts)] for j in range(batch_size)]
                position = (position + batch_size) % len(texts)
                return batch

            warm_end = time.perf_counter() + WARMUP_S
            while time.perf_counter() < warm_end:
                classify(next_batch())
            load_before = os.getloadavg()[0]
            latencies = []
            cpu0, start = time.process_time(), time.perf_counter()
            end = start + args.seconds
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    break
                predicted, _ = classify(next_batch())
                t1 = time.perf_counter()
                if len(predicted) != batch_size:
                    raise BenchError("PyTorch returned the wrong number of labels")
                latencies.append(t1 - t0)
            wall = time.perf_counter() - start
            cpu = time.process_time() - cpu0
            level = {
                "batch_size": batch_size,
                "seconds": round(wall, 3),
                "warmup_seconds": WARMUP_S,
                "calls": len(latencies),
                "examples_per_s": round(len(latencies) * batch_size / wall, 2),
                "latency_per_call": latency_summary(latencies),
                "cores_used": round(cpu / wall, 2),
                "load_1min_before": round(load_before, 2),
            }
            lat = level["latency_per_call"]
            log(
                f"torch b={batch_size:<3} {level['examples_per_s']:>9.1f} ex/s   p50 {lat['p50_ms']} ms  "
                f"p99 {lat['p99_ms']} ms per call  cores {level['cores_used']}"
            )
            levels.append(level)

    report["torch"] = {
        "model_dir": str(model_dir),
        "load_seconds": round(load_s, 2),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "labels": labels,
        "levels": levels,
        "kiln_agreement": agreement,
    }
    report["versions"].update(
        torch=torch.__version__,
        transformers=transformers.__version__,
        tokenizers=__import__("tokenizers").__version__,
    )


# ---------------------------------------------------------------------------------------------
# report


def compare(report: dict, levels: list[int]) -> dict:
    kiln = {l["clients"]: l for l in (report.get("kiln") or {}).get("levels", [])}
    torch_ = {l["batch_size"]: l for l in (report.get("torch") or {}).get("levels", [])}
    rows, throughput_ok, p99_ok = [], [], None
    for c in levels:
        k, t = kiln.get(c), torch_.get(c)
        row = {"level": c}
        if k:
            row.update(
                kiln_req_per_s=k["requests_per_s"],
                kiln_p50_ms=k["latency"]["p50_ms"],
                kiln_p99_ms=k["latency"]["p99_ms"],
                kiln_p99_over_p50=k.get("p99_over_p50"),
                kiln_errors=k["errors"],
            )
        if t:
            row.update(
                torch_ex_per_s=t["examples_per_s"],
                torch_p50_ms_per_batch=t["latency_per_call"]["p50_ms"],
                torch_p99_ms_per_batch=t["latency_per_call"]["p99_ms"],
            )
        if k and t and t["examples_per_s"]:
            row["kiln_over_torch_throughput"] = round(k["requests_per_s"] / t["examples_per_s"], 3)
            throughput_ok.append(k["requests_per_s"] > t["examples_per_s"] and k["errors"] == 0)
        if k and c == P99_LEVEL and k.get("p99_over_p50") is not None:
            p99_ok = k["p99_over_p50"] < P99_OVER_P50_MAX
        rows.append(row)
    return {
        "rows": rows,
        "targets": {
            "kiln_throughput_above_torch_at_every_level": all(throughput_ok) if throughput_ok else None,
            f"kiln_p99_under_{P99_OVER_P50_MAX:g}x_p50_at_{P99_LEVEL}_clients": p99_ok,
        },
    }


def print_table(comparison: dict, input_kind: str = "text") -> None:
    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    header = [
        "level", "kiln req/s", "kiln p50 ms", "kiln p99 ms", "p99/p50",
        "torch ex/s", "torch p50 ms/batch", "kiln/torch",
    ]  # fmt: skip
    lines = [header]
    for r in comparison["rows"]:
        lines.append([
            str(r["level"]),
            fmt(r.get("kiln_req_per_s")),
            fmt(r.get("kiln_p50_ms"), ".2f"),
            fmt(r.get("kiln_p99_ms"), ".2f"),
            fmt(r.get("kiln_p99_over_p50"), ".2f"),
            fmt(r.get("torch_ex_per_s")),
            fmt(r.get("torch_p50_ms_per_batch"), ".2f"),
            fmt(r.get("kiln_over_torch_throughput"), ".2f"),
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    print()
    for n, row in enumerate(lines):
        print("| " + " | ".join(cell.rjust(w) for cell, w in zip(row, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(f"(level = concurrent clients for kiln, one {input_kind} per request; batch size for PyTorch)")
    for name, held in comparison["targets"].items():
        print(f"target {name}: {'-' if held is None else ('yes' if held else 'NO')}")


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    now = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kiln", default=str(REPO / "target/release/kiln"), help="the kiln binary")
    p.add_argument(
        "--minilm",
        default=os.path.expanduser("~/.cache/kiln-models/sentence-transformers/all-MiniLM-L6-v2"),
        help="the all-MiniLM-L6-v2 directory (scripts/fetch-minilm.sh)",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level (after 2 s warm-up)")
    p.add_argument("--levels", default="1,8,64", help="concurrent clients (kiln) and batch sizes (PyTorch)")
    p.add_argument("--out", default=str(REPO / f"bench/results/serve-{now}.json"))
    p.add_argument("--database-url", default=os.environ.get("KILN_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--tmp-dir", default=None, help="parent of the temporary directory (default: the system's)")
    p.add_argument("--model-dir", default=None, help="serve this fine-tuned directory instead of training one")
    p.add_argument("--skip-kiln", action="store_true", help="PyTorch only (needs --model-dir)")
    p.add_argument("--skip-torch", action="store_true", help="kiln only")
    args = p.parse_args()
    try:
        args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        p.error("--levels must be comma-separated integers")
    if not args.levels or min(args.levels) < 1:
        p.error("--levels must be positive integers")
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    if args.skip_kiln and not args.model_dir:
        p.error("--skip-kiln needs --model-dir (there is no kiln to train the model)")
    if not args.skip_kiln and not os.access(args.kiln, os.X_OK):
        p.error(f"no kiln binary at {args.kiln}: cargo build --release (or pass --kiln)")
    if not args.model_dir and not (Path(args.minilm) / "config.json").is_file():
        p.error(f"no model at --minilm {args.minilm}: run scripts/fetch-minilm.sh")
    if args.model_dir and not (Path(args.model_dir) / "config.json").is_file():
        p.error(f"--model-dir {args.model_dir} has no config.json")
    return args


def main() -> int:
    args = parse_args()

    def on_signal(signum, frame):  # run the cleanup on Ctrl-C / SIGTERM too
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)

    texts = read_texts(REPO / "tests/data/topics-valid.jsonl")
    report = {
        "benchmark": "serve_minilm",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "versions": {
            "kiln": None if args.skip_kiln else command_output([args.kiln, "--version"]),
            "git": command_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO),
            "git_dirty": bool(command_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO)),
        },
        "settings": {
            "seconds_per_level": args.seconds,
            "warmup_seconds": WARMUP_S,
            "levels": args.levels,
            "texts": "tests/data/topics-valid.jsonl",
            "n_texts": len(texts),
            "kiln_request": "POST /v1/classifications, one text per request, keep-alive connection per client thread (http.client)",
            "torch_call": "tokenize b texts (padding=True) + forward + softmax + argmax, torch.inference_mode, float32",
        },
    }
    cleanup: list = []
    tmp = Path(tempfile.mkdtemp(prefix="kiln-serve-bench-", dir=args.tmp_dir))
    cleanup.append(("remove temporary directory", lambda: shutil.rmtree(tmp, ignore_errors=True)))
    failed = False
    try:
        served = tmp / "models" / MODEL_ID
        if args.model_dir:
            served.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(args.model_dir, served, symlinks=True)
            report["model"] = {"source": "--model-dir", "dir": str(Path(args.model_dir).resolve())}
        else:
            report["model"] = {
                "source": "kiln train",
                "base": args.minilm,
                **train_model(args.kiln, args.minilm, served, tmp / "work", tmp / "data"),
            }
        if not args.skip_kiln:
            bench_kiln(args, tmp, cleanup, lambda server, key: measure_kiln(args, server, key, texts, report))
        if not args.skip_torch:
            bench_torch(args, served, texts, report)
    except (BenchError, KeyboardInterrupt, Exception) as e:
        failed = True
        if isinstance(e, BenchError):
            log(f"serve_minilm: error: {e}")
        elif isinstance(e, KeyboardInterrupt):
            log(f"serve_minilm: interrupted ({e})")
        else:
            traceback.print_exc()
    finally:
        for what, step in reversed(cleanup):
            try:
                step()
            except Exception as e:
                log(f"cleanup '{what}' failed: {e}")
    if failed:
        return 1

    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    comparison = compare(report, args.levels)
    report["comparison"] = comparison
    print_table(comparison)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nfigures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
