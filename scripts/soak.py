#!/usr/bin/env python3
"""Soak and chaos run for kiln (issue 10, item 5). Not part of CI: it runs for an hour by default.

    python3 scripts/soak.py --minutes 60 --out bench/results/soak-YYYY-MM-DD.json

What it does, all on this machine and in a fresh temporary directory:

* starts its own PostgreSQL cluster (initdb/pg_ctl from /usr/lib/postgresql/*/bin, run as the
  `postgres` user, trust auth, a free port from 55432 up; the machine's own cluster is never
  touched);
* writes a tiny random BERT (hidden 64, 2 layers, 2 heads) in Hugging Face layout with a
  WordPiece tokenizer.json over the vocabulary of tests/data/topics-*.jsonl (pure stdlib: the
  safetensors file is written by hand), and checks that `kiln models list --local` and
  GET /v1/models see it;
* runs `kiln serve` (API only, KILN_WORKERS=0) and --workers `kiln worker` processes on the
  same database and data directory (the local artifact store is shared through it), each with
  CANDLE_NUM_THREADS=1 / RAYON_NUM_THREADS=1 and JSON logs;
* for --minutes: uploads files and creates small jobs (strategies full/head_only/lora/freeze,
  1-4 epochs, random seeds, small checkpoint_every_steps, some with a validation file, a few
  fine-tuning an earlier fine-tuned model), with Idempotency-Key and retries when the API
  answers 5xx; cancels a fraction (right after creation, or later while running); pauses and
  later resumes a few; sends inference traffic (POST /v1/classifications to finished models
  and checkpoints, POST /v1/embeddings to the base model), polls job lists, jobs, events,
  checkpoints, models and files, and follows some event streams (SSE);
* injects faults: `kill -9` of a worker process (mostly one that holds a running job; worker
  w0 is never killed so that one worker's memory can be followed for the whole run), SIGTERM
  of a worker (graceful shutdown), and every few minutes a PostgreSQL restart
  (`pg_ctl restart -m fast`, `-m immediate`, or a stop of some seconds then a start);
* logs every action and fault with a timestamp to a JSONL log;
* at the end stops the faults and the load, resumes what it paused, lets every job drain
  (--drain-minutes), then checks the invariants below with SQL (psql) and the API, prints a
  summary, writes a JSON result to --out and exits 1 when an invariant is broken.

Invariants checked:
  none_lost            every job created with a 200 exists (DB and API), and no job appeared
                       that the script did not create
  all_terminal         every job is succeeded, failed or cancelled
  expected_state       cancelled jobs (cancel accepted) are `cancelled`; a cancel that lost the
                       race to the end is counted as a race; the rest `succeeded`; every
                       `failed` job must be explained by the faults injected (its charged
                       attempts were on killed workers or overlapped a PostgreSQL outage)
  no_concurrent_attempts  per job, no event or checkpoint of attempt a after attempt a+1 began,
                       one worker per attempt, attempts numbered 1..n; and from the workers'
                       own logs, no two processes holding the same job at the same time
  checkpoints_present  every checkpoint row's directory exists (non-empty) in the artifact
                       store; every succeeded job's model and result file exist
  resumed_from_latest  every retried attempt that trained resumed from the latest checkpoint
                       saved before it began (the engine's "Resumed from the checkpoint at
                       step N" message), and trained no step at or before N; or from scratch
                       when there was none
  http_5xx_only_during_pg_faults  any 5xx (or refused connection) overlapped a PostgreSQL
                       fault window (plus a short grace)
  inference_ok         classification of succeeded models/checkpoints never answered 4xx
  memory_flat          RSS of `kiln serve` and of the never-killed worker, sampled every 30 s
                       from /proc/PID/status: the first-10-minutes, second-10-minutes and
                       last-10-minutes means and the max are reported; the first window is
                       warm-up, so the rule is last mean <= second mean + max(32 MiB, 25 %)
  processes_ok         no kiln process exited unless the script killed or stopped it, and the
                       final SIGTERM stops every one cleanly (exit 0)
"""

import argparse
import array
import collections
import datetime
import glob
import heapq
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADMIN_KEY = "sk-kiln-soak-admin-" + uuid.uuid4().hex
BASE_MODEL = "soak/tiny-bert"
TERMINAL = {"succeeded", "failed", "cancelled"}
ACTIVE = {"validating_files", "queued", "running", "paused"}
# After PostgreSQL is back, requests may still fail this long (pools reconnect).
PG_GRACE_S = 15.0
# kiln's default lease (src/queue/mod.rs): a job whose worker died is reaped after it.
LEASE_S = 30.0


def iso(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")


def parse_ts(text):
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except Exception:
        return None


def mib(kib):
    return None if kib is None else round(kib / 1024.0, 1)


class Journal:
    """The JSONL log of every action, fault and anomaly."""

    def __init__(self, path):
        self.path = path
        self.f = open(path, "a", buffering=1)
        self.lock = threading.Lock()
        self.anomalies = []
        self.script_errors = []

    def log(self, kind, **fields):
        t = time.time()
        rec = {"t": round(t, 3), "iso": iso(t), "kind": kind}
        rec.update(fields)
        line = json.dumps(rec, default=str)
        with self.lock:
            self.f.write(line + "\n")
        return rec

    def anomaly(self, what, **fields):
        rec = self.log("anomaly", what=what, **fields)
        with self.lock:
            self.anomalies.append(rec)
        print(f"[soak] ANOMALY {what}: {json.dumps(fields, default=str)[:400]}", flush=True)
        return rec

    def script_error(self, where):
        tb = traceback.format_exc()
        rec = self.log("script_error", where=where, traceback=tb)
        with self.lock:
            self.script_errors.append(rec)
        print(f"[soak] script error in {where}:\n{tb}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# HTTP


class Stats:
    """Request counts by endpoint and status; every 5xx and failed connection with its times."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.defaultdict(collections.Counter)
        self.bad = []

    def record(self, kind, status, t0, t1, detail):
        with self.lock:
            self.counts[kind][str(status)] += 1
            if status == 0 or status >= 500:
                self.bad.append({"endpoint": kind, "status": status, "t0": round(t0, 3),
                                 "t1": round(t1, 3), "iso": iso(t0), "detail": detail})


class Api:
    def __init__(self, port, key, stats):
        self.port = port
        self.key = key
        self.stats = stats

    def request(self, method, path, body=None, kind=None, timeout=60, headers=None,
                content_type=None, record=True):
        kind = kind or f"{method} {path.split('?')[0]}"
        hdrs = {"Authorization": "Bearer " + self.key}
        if headers:
            hdrs.update(headers)
        data = None
        if body is not None:
            if isinstance(body, (bytes, bytearray)):
                data = bytes(body)
                hdrs["Content-Type"] = content_type or "application/octet-stream"
            else:
                data = json.dumps(body).encode()
                hdrs["Content-Type"] = "application/json"
        elif method == "POST":
            hdrs["Content-Type"] = "application/json"
        t0 = time.time()
        status, raw, detail = 0, b"", None
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
            status = resp.status
        except Exception as e:  # refused, reset, timed out
            detail = repr(e)[:300]
        finally:
            conn.close()
        t1 = time.time()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        if status >= 500 and detail is None:
            detail = json.dumps(parsed)[:300] if not isinstance(parsed, str) else parsed[:300]
        if record:
            self.stats.record(kind, status, t0, t1, detail)
        return status, parsed

    def upload(self, filename, content, purpose="fine-tune"):
        boundary = "soak" + uuid.uuid4().hex
        parts = []
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n".encode())
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
                     "Content-Type: application/jsonl\r\n\r\n".encode() + content + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        return self.request("POST", "/v1/files", b"".join(parts), kind="POST /v1/files",
                            content_type=f"multipart/form-data; boundary={boundary}")


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def free_port(preferred):
    for port in list(range(preferred, preferred + 200)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port from {preferred}")


class Postgres:
    def __init__(self, root, port, journal):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                      key=lambda p: int(re.sub(r"\D", "", p.split("/")[-2]) or 0))
        if not bins:
            raise RuntimeError("no /usr/lib/postgresql/*/bin: install postgresql")
        self.bin = bins[-1]
        self.root = root
        self.data = os.path.join(root, "data")
        self.sock = os.path.join(root, "sock")
        self.logfile = os.path.join(root, "postgres.log")
        self.port = port
        self.journal = journal
        self.lock = threading.Lock()
        self.windows = []  # PostgreSQL fault windows: {kind, start, end}
        self.up = threading.Event()

    def url(self, db="kiln"):
        return f"postgres://postgres@127.0.0.1:{self.port}/{db}"

    def _as_postgres(self, args, timeout=180):
        r = subprocess.run(["runuser", "-u", "postgres", "--"] + args, capture_output=True,
                           text=True, timeout=timeout, cwd="/")
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
        return r

    def init(self):
        os.makedirs(self.sock, exist_ok=True)
        subprocess.run(["chown", "-R", "postgres:postgres", self.root], check=True)
        self._as_postgres([f"{self.bin}/initdb", "-D", self.data, "-U", "postgres",
                           "--auth=trust", "-E", "UTF8", "--locale=C"])
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"\n# kiln soak\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.sock}'\nmax_connections = 200\n"
                    "shared_buffers = 64MB\nlog_min_messages = warning\n")

    def ctl(self, *args, timeout=180):
        with self.lock:
            return self._as_postgres([f"{self.bin}/pg_ctl", "-D", self.data, "-l", self.logfile,
                                      "-w", "-t", "120"] + list(args), timeout=timeout)

    def start(self):
        self.ctl("start")
        self.wait_ready()

    def psql(self, sql, db="kiln", timeout=120):
        env = dict(os.environ, PGCONNECT_TIMEOUT="5")
        r = subprocess.run([f"{self.bin}/psql", "-h", "127.0.0.1", "-p", str(self.port), "-U",
                            "postgres", "-d", db, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
                            "-c", sql], capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"psql failed: {r.stderr.strip()[-500:]}")
        return r.stdout

    def query(self, sql, timeout=120):
        out = self.psql(f"SELECT coalesce(json_agg(row_to_json(q)), '[]'::json) FROM ({sql}) q",
                        timeout=timeout)
        return json.loads(out.strip() or "[]")

    def try_query(self, sql):
        if not self.up.is_set():
            return None
        try:
            return self.query(sql, timeout=20)
        except Exception:
            return None

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                self.psql("SELECT 1", db="postgres", timeout=10)
                self.up.set()
                return
            except Exception:
                time.sleep(0.3)
        raise RuntimeError("PostgreSQL did not come up")

    def fault(self, kind, down_s=0.0):
        """One PostgreSQL fault; returns its window (start: before the command, end: when it
        answers again)."""
        start = time.time()
        self.up.clear()
        self.journal.log("fault_begin", fault=kind, down_s=down_s)
        error = None
        try:
            if kind == "pg_restart_fast":
                self.ctl("restart", "-m", "fast")
            elif kind == "pg_restart_immediate":
                self.ctl("restart", "-m", "immediate")
            elif kind == "pg_outage":
                self.ctl("stop", "-m", random.choice(["fast", "immediate"]))
                time.sleep(down_s)
                self.ctl("start")
            else:
                raise ValueError(kind)
            self.wait_ready()
        except Exception as e:
            # Whatever happened, PostgreSQL must be up again for the run to go on.
            error = repr(e)[:500]
            self.journal.anomaly("pg_fault_command_failed", fault=kind, error=error)
            for _ in range(5):
                try:
                    self.ctl("start")
                except Exception:
                    pass
                try:
                    self.wait_ready(30)
                    break
                except Exception:
                    time.sleep(2)
            self.wait_ready()
        end = time.time()
        window = {"kind": kind, "start": round(start, 3), "end": round(end, 3),
                  "seconds": round(end - start, 2)}
        if error:
            window["error"] = error
        self.windows.append(window)
        return window


# ---------------------------------------------------------------------------------------------
# The tiny model and the data


def words_of(text):
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, (shape, values) in tensors.items():
        buf = array.array("f", values).tobytes()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(buf)]}
        blobs.append(buf)
        offset += len(buf)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def write_tiny_bert(model_dir, vocab_words, seed=7):
    """A random BERT in the layout of `BertForPreTraining` checkpoints (bert.* + pooler + MLM
    head), as kiln's own tests write it (src/nn/tiny.rs), and a WordPiece tokenizer.json
    with BERT normalisation and the [CLS] ... [SEP] template."""
    os.makedirs(model_dir, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in vocab_words:
        if w not in vocab:
            vocab[w] = len(vocab)
    h, inter, layers, heads, positions = 64, 128, 2, 2, 128
    v = len(vocab)
    config = {
        "architectures": ["BertForPreTraining"], "model_type": "bert", "vocab_size": v,
        "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": inter, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": positions,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "position_embedding_type": "absolute", "initializer_range": 0.02,
    }
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    rng = random.Random(seed)
    tensors = {}

    def put(name, shape, center, half):
        n = 1
        for d in shape:
            n *= d
        tensors[name] = (shape, [center + rng.uniform(-half, half) for _ in range(n)])

    w = 0.17
    put("bert.embeddings.word_embeddings.weight", (v, h), 0.0, w)
    put("bert.embeddings.position_embeddings.weight", (positions, h), 0.0, w)
    put("bert.embeddings.token_type_embeddings.weight", (2, h), 0.0, w)
    put("bert.embeddings.LayerNorm.weight", (h,), 1.0, 0.1)
    put("bert.embeddings.LayerNorm.bias", (h,), 0.0, 0.1)
    for l in range(layers):
        p = f"bert.encoder.layer.{l}"
        for name, out_dim, in_dim in [("attention.self.query", h, h), ("attention.self.key", h, h),
                                      ("attention.self.value", h, h), ("attention.output.dense", h, h),
                                      ("intermediate.dense", inter, h), ("output.dense", h, inter)]:
            put(f"{p}.{name}.weight", (out_dim, in_dim), 0.0, w)
            put(f"{p}.{name}.bias", (out_dim,), 0.0, 0.05)
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"]:
            put(f"{p}.{ln}.weight", (h,), 1.0, 0.1)
            put(f"{p}.{ln}.bias", (h,), 0.0, 0.1)
    put("bert.pooler.dense.weight", (h, h), 0.0, w)
    put("bert.pooler.dense.bias", (h,), 0.0, 0.05)
    put("cls.predictions.transform.dense.weight", (h, h), 0.0, w)
    put("cls.predictions.transform.dense.bias", (h,), 0.0, 0.05)
    put("cls.predictions.transform.LayerNorm.weight", (h,), 1.0, 0.1)
    put("cls.predictions.transform.LayerNorm.bias", (h,), 0.0, 0.1)
    put("cls.predictions.bias", (v,), 0.0, 0.05)
    write_safetensors(os.path.join(model_dir, "model.safetensors"), tensors)

    special = lambda t: {"id": t, "ids": [vocab[t]], "tokens": [t]}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, t in enumerate(specials)],
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": special("[CLS]"), "[SEP]": special("[SEP]")},
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab},
    }
    with open(os.path.join(model_dir, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)
    return {"vocab_size": v, "parameters": sum(len(x[1]) for x in tensors.values())}


def load_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# kiln processes


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Incarnation:
    """One start of one kiln process."""

    def __init__(self, name, n, argv, env, log_path):
        self.name, self.n, self.log_path = name, n, log_path
        self.logf = open(log_path, "ab")
        self.p = subprocess.Popen(argv, env=env, stdout=self.logf, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True, cwd="/")
        self.pid = self.p.pid
        self.started = time.time()
        self.ended = None
        self.end_reason = None   # kill9 | sigterm | final_sigterm | unexpected
        self.expected_exit = False
        self.rc = None

    def alive(self):
        return self.p.poll() is None

    def signal(self, sig, reason):
        self.expected_exit = True
        self.end_reason = reason
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout):
        try:
            self.rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if self.ended is None:
            self.ended = time.time()
        self.logf.close()
        return self.rc

    def info(self):
        return {"name": self.name, "n": self.n, "pid": self.pid, "log": self.log_path,
                "started": round(self.started, 3), "ended": self.ended and round(self.ended, 3),
                "end_reason": self.end_reason, "rc": self.rc}


class Cluster:
    """`kiln serve` and the worker slots, with a supervisor that restarts them."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.lock = threading.Lock()
        self.serve = None
        self.serves = []
        self.slots = {}          # slot -> current Incarnation (or None while down)
        self.history = []        # every worker Incarnation
        self.restart_at = {}     # slot -> time to (re)start it
        self.counter = collections.Counter()

    def env(self, extra):
        c = self.ctx
        env = dict(os.environ)
        for k in list(env):
            if k.startswith("KILN_") or k == "DATABASE_URL":
                del env[k]
        env.update({
            "DATABASE_URL": c.pg.url(), "KILN_DATA_DIR": c.data_dir, "KILN_MODELS_DIR": c.models_dir,
            "KILN_LOG_FORMAT": "json", "KILN_LOG": "info,sqlx=warn,tower_http=warn",
            "CANDLE_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
        })
        env.update(extra)
        return env

    def start_serve(self):
        c = self.ctx
        self.counter["serve"] += 1
        n = self.counter["serve"]
        env = self.env({"KILN_ADDR": f"127.0.0.1:{c.port}", "KILN_ADMIN_KEY": ADMIN_KEY,
                        "KILN_WORKERS": "0", "KILN_SERVE_THREADS": "1",
                        "KILN_SERVE_MEMORY": c.args.serve_memory})
        inc = Incarnation("serve", n, [c.kiln, "serve"], env, os.path.join(c.logs, f"serve-{n}.log"))
        self.serve = inc
        self.serves.append(inc)
        c.journal.log("process_start", name="serve", n=n, pid=inc.pid)
        deadline = time.time() + 120
        while time.time() < deadline:
            if not inc.alive():
                raise RuntimeError(f"kiln serve exited ({inc.p.returncode}); see {inc.log_path}")
            st, _ = c.api.request("GET", "/healthz", kind="GET /healthz", timeout=5, record=False)
            if st == 200:
                return inc
            time.sleep(0.5)
        raise RuntimeError("kiln serve did not answer /healthz within 120 s")

    def start_worker(self, slot):
        c = self.ctx
        self.counter[slot] += 1
        n = self.counter[slot]
        env = self.env({"KILN_WORKERS": "1"})
        inc = Incarnation(slot, n, [c.kiln, "worker"], env, os.path.join(c.logs, f"worker-{slot}-{n}.log"))
        with self.lock:
            self.slots[slot] = inc
            self.history.append(inc)
            self.restart_at.pop(slot, None)
        c.journal.log("process_start", name=slot, n=n, pid=inc.pid)
        return inc

    def slot_of_pid(self, pid):
        with self.lock:
            for inc in self.history:
                if inc.pid == pid:
                    return inc
        return None

    def schedule_restart(self, slot, delay):
        with self.lock:
            self.restart_at[slot] = time.time() + delay

    def supervise_once(self):
        c = self.ctx
        now = time.time()
        with self.lock:
            current = dict(self.slots)
        for slot, inc in current.items():
            if inc is None:
                continue
            if not inc.alive():
                rc = inc.p.returncode
                if inc.ended is None:
                    inc.ended = now
                inc.rc = rc
                with self.lock:
                    self.slots[slot] = None
                try:
                    inc.logf.close()
                except Exception:
                    pass
                if not inc.expected_exit:
                    young = inc.ended - inc.started < 60
                    if young and overlaps_window(c, inc.started, inc.ended):
                        # It could not reach PostgreSQL while starting: not a crash.
                        inc.end_reason = "start_failed_during_pg_fault"
                        c.journal.log("worker_start_failed_during_pg_fault", slot=slot, pid=inc.pid,
                                      rc=rc, log_tail=tail(inc.log_path, 3))
                    else:
                        inc.end_reason = "unexpected"
                        c.journal.anomaly("worker_exited_unexpectedly", slot=slot, pid=inc.pid, rc=rc,
                                          pg_up=c.pg.up.is_set(), log_tail=tail(inc.log_path))
                    self.schedule_restart(slot, 3.0)
                elif slot not in self.restart_at and not c.final_shutdown.is_set():
                    self.schedule_restart(slot, 3.0)
        with self.lock:
            due = [s for s, t in self.restart_at.items() if t <= now]
        for slot in due:
            if c.final_shutdown.is_set():
                break
            # A worker started while PostgreSQL is down exits at once: wait for it.
            if not c.pg.up.is_set():
                continue
            if self.slots.get(slot) is None:
                self.start_worker(slot)
            else:
                with self.lock:
                    self.restart_at.pop(slot, None)
        if self.serve is not None and not self.serve.alive() and not self.serve.expected_exit:
            inc = self.serve
            inc.ended, inc.rc, inc.end_reason = now, inc.p.returncode, "unexpected"
            c.journal.anomaly("serve_exited_unexpectedly", pid=inc.pid, rc=inc.rc,
                              log_tail=tail(inc.log_path))
            if not c.final_shutdown.is_set():
                while not c.pg.up.is_set():
                    time.sleep(1)
                self.start_serve()


def tail(path, n=15):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 8000))
            return f.read().decode("utf-8", "replace").splitlines()[-n:]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# The run


class Ctx:
    pass


def worker_pid(worker_id):
    """kiln's worker ids are `{host}-{pid}-{random}`."""
    try:
        return int(worker_id.rsplit("-", 2)[1])
    except Exception:
        return None


def loop_thread(ctx, name, body, stop_event, every):
    def run():
        while not stop_event.is_set():
            try:
                body()
            except Exception:
                ctx.journal.script_error(name)
            stop_event.wait(every() if callable(every) else every)
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


class Load:
    """Job submissions, cancels, pauses and resumes, inference and polling."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.lock = threading.Lock()
        self.jobs = {}            # id -> record
        self.n = 0
        self.files = []           # processed training file ids, with their sizes
        self.valid_files = []
        self.pending_files = []   # uploaded, not yet processed
        self.actions = []         # heap of (t, seq, action, job_id)
        self.seq = 0
        self.models = []          # succeeded fine-tuned model ids
        self.model_of = {}        # model id -> job id
        self.ckpt_models = []
        self.create_failures = []
        self.streams = collections.Counter()
        self.inference_unexpected = []
        self.labels = sorted({r["label"] for r in ctx.train_rows})

    # -- files ----------------------------------------------------------------------------
    def upload_training_file(self, size, validation=False):
        """A dataset of `size` examples, each one to three sentences of one topic from
        tests/data/topics-*.jsonl (so jobs last seconds, not milliseconds)."""
        c = self.ctx
        by_label = collections.defaultdict(list)
        for r in (c.valid_rows if validation else c.train_rows):
            by_label[r["label"]].append(r["text"])
        labels = sorted(by_label)
        sample = []
        for i in range(size):
            label = labels[i % len(labels)]
            k = random.choice([1, 2, 3])
            sample.append({"text": " ".join(random.sample(by_label[label], k)), "label": label})
        random.shuffle(sample)
        content = ("\n".join(json.dumps(r) for r in sample) + "\n").encode()
        name = f"soak-{'valid' if validation else 'train'}-{size}-{uuid.uuid4().hex[:6]}.jsonl"
        for attempt in range(6):
            st, body = c.api.upload(name, content)
            if st == 200:
                c.journal.log("file_upload", file=body["id"], examples=len(sample), validation=validation)
                with self.lock:
                    self.pending_files.append((body["id"], len(sample), validation, time.time()))
                return body["id"]
            if st and st < 500:
                c.journal.anomaly("file_upload_rejected", status=st, body=body)
                return None
            time.sleep(2)
        return None

    def check_pending_files(self):
        c = self.ctx
        with self.lock:
            pending = list(self.pending_files)
        for fid, size, validation, t in pending:
            st, body = c.api.request("GET", f"/v1/files/{fid}", kind="GET /v1/files/{id}")
            if st != 200:
                continue
            status = body.get("status")
            if status == "processed":
                with self.lock:
                    self.pending_files.remove((fid, size, validation, t))
                    (self.valid_files if validation else self.files).append((fid, size))
            elif status == "error":
                with self.lock:
                    self.pending_files.remove((fid, size, validation, t))
                c.journal.anomaly("file_validation_error", file=fid, body=body)
            elif time.time() - t > 300:
                with self.lock:
                    self.pending_files.remove((fid, size, validation, t))
                c.journal.anomaly("file_not_processed_in_5_minutes", file=fid, status=status)

    # -- jobs -----------------------------------------------------------------------------
    def active_count(self):
        with self.lock:
            return sum(1 for j in self.jobs.values() if j["status"] not in TERMINAL)

    def create_job(self):
        c = self.ctx
        with self.lock:
            if not self.files:
                return
            fid, size = random.choice(self.files)
            vfid = random.choice(self.valid_files)[0] if self.valid_files and random.random() < 0.5 else None
            self.n += 1
            n = self.n
            parents = list(self.models)
        strategy = random.choice(["full", "head_only", "lora", "freeze"])
        bs = random.choice([4, 8, 8, 16])
        epochs = random.choice([1, 2, 2, 3, 4])
        if strategy == "head_only":  # (features are cached: much cheaper per step)
            epochs *= 3
        steps = max(1, math.ceil(size / bs)) * epochs
        hp = {"n_epochs": epochs, "batch_size": bs, "strategy": strategy,
              "checkpoint_every_steps": max(2, steps // random.randint(3, 6))}
        if strategy == "freeze":
            hp["freeze_layers"] = 1
        if strategy == "lora":
            hp["lora_rank"] = random.choice([2, 4, 8])
        if random.random() < 0.5:
            hp["learning_rate"] = random.choice([1e-3, 3e-3, 5e-3])
        if vfid and random.random() < 0.5:
            hp["eval_every_steps"] = hp["checkpoint_every_steps"]
        model = BASE_MODEL
        if parents and random.random() < 0.06:
            model = random.choice(parents)
        body = {"model": model, "training_file": fid, "suffix": f"soak{n % 7}",
                "seed": random.randint(0, 2 ** 31 - 1), "priority": random.choice([4, 5, 5, 5, 6]),
                "metadata": {"soak_run": c.run_id, "soak_n": str(n)},
                "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
        if vfid:
            body["validation_file"] = vfid
        key = f"soak-{c.run_id}-{n}"
        tries = []
        for attempt in range(8):
            st, resp = c.api.request("POST", "/v1/fine_tuning/jobs", body, kind="POST /v1/fine_tuning/jobs",
                                     headers={"Idempotency-Key": key})
            tries.append(st)
            if st == 200:
                break
            if st and st < 500:
                c.journal.anomaly("job_create_rejected", status=st, body=resp, request=body)
                return
            time.sleep(2 + attempt)
        else:
            self.create_failures.append({"n": n, "tries": tries, "idempotency_key": key})
            c.journal.log("job_create_gave_up", n=n, tries=tries)
            return
        jid = resp["id"]
        rec = {"id": jid, "n": n, "created_t": time.time(), "status": resp.get("status", "queued"),
               "model": model, "hp": hp, "examples": size, "validation": bool(vfid), "tries": tries,
               "cancel": None, "cancel_tries": [], "pauses": [], "resumes": [], "fine_tuned_model": None}
        with self.lock:
            self.jobs[jid] = rec
        c.journal.log("job_create", job=jid, n=n, model=model, hp=hp, examples=size,
                      validation_file=vfid, tries=tries)
        r = random.random()
        if r < c.args.cancel_fraction / 3:
            self.schedule(random.uniform(0, 1), "cancel", jid)              # most likely queued
        elif r < c.args.cancel_fraction:
            self.schedule(random.uniform(0.5, 3), "when_running:cancel", jid)
        elif r < c.args.cancel_fraction + c.args.pause_fraction / 3:
            self.schedule(random.uniform(0, 1), "pause", jid)
        elif r < c.args.cancel_fraction + c.args.pause_fraction:
            self.schedule(random.uniform(0.5, 3), "when_running:pause", jid)

    def schedule(self, delay, action, jid, retry=0):
        with self.lock:
            self.seq += 1
            heapq.heappush(self.actions, (time.time() + delay, self.seq, action, jid, retry))

    def run_actions(self):
        c = self.ctx
        while True:
            with self.lock:
                if not self.actions or self.actions[0][0] > time.time():
                    return
                _, _, action, jid, retry = heapq.heappop(self.actions)
            # Once the load is over only resumes (nothing may stay paused) and the retries of
            # cancels already sent still run.
            if c.stop_load.is_set() and not (action == "resume" or (action == "cancel" and retry > 0)):
                continue
            if action.startswith("when_running:"):
                self.when_running(action.split(":", 1)[1], jid, retry)
            else:
                {"cancel": self.do_cancel, "pause": self.do_pause, "resume": self.do_resume}[action](jid, retry)

    def when_running(self, action, jid, retry):
        """Sends `action` once the job is seen running (so it hits a worker mid-training)."""
        c = self.ctx
        st, j = c.api.request("GET", f"/v1/fine_tuning/jobs/{jid}", kind="GET /v1/fine_tuning/jobs/{id}")
        status = j.get("status") if st == 200 and isinstance(j, dict) else None
        if status == "running":
            {"cancel": self.do_cancel, "pause": self.do_pause}[action](jid, 0)
        elif status in TERMINAL:
            self.jobs[jid]["not_sent"] = f"{action}: the job ended before it was seen running"
        elif retry < 600:
            self.schedule(0.3, "when_running:" + action, jid, retry + 1)

    def _steer(self, action, jid):
        c = self.ctx
        st, body = c.api.request("POST", f"/v1/fine_tuning/jobs/{jid}/{action}",
                                 kind=f"POST /v1/fine_tuning/jobs/{{id}}/{action}")
        status = body.get("status") if isinstance(body, dict) else None
        err = body.get("error") if isinstance(body, dict) else None
        return st, status, err

    def do_cancel(self, jid, retry=0):
        """A 200 means the cancel took (at once or as a request the worker must honour); a 400
        that the job had already ended (a race); no answer (5xx, refused) leaves it uncertain
        whether the cancel was applied, so it is retried, and stays uncertain if it never
        gets an answer."""
        c = self.ctx
        rec = self.jobs[jid]
        st, status, err = self._steer("cancel", jid)
        rec["cancel_tries"].append({"t": time.time(), "http": st, "status": status})
        if st == 200:
            rec["cancel"] = {"t": time.time(), "outcome": "accepted", "status_after": status}
        elif st == 0 or st >= 500:
            if not rec["cancel"]:
                rec["cancel"] = {"t": time.time(), "outcome": "uncertain"}
            if retry < 5:
                self.schedule(3, "cancel", jid, retry + 1)
        elif not rec["cancel"] or rec["cancel"]["outcome"] == "uncertain":
            msg = (err or {}).get("message", "")
            rec["cancel"] = {"t": time.time(), "outcome": "refused", "http": st, "message": msg}
        c.journal.log("cancel", job=jid, http=st, status_after=status, error=err, retry=retry)

    def do_pause(self, jid, retry=0):
        c = self.ctx
        rec = self.jobs[jid]
        if rec["cancel"]:
            return
        st, status, err = self._steer("pause", jid)
        rec["pauses"].append({"t": time.time(), "http": st, "status": status})
        c.journal.log("pause", job=jid, http=st, status_after=status, error=err)
        if st == 200 or st == 0 or st >= 500:
            # (no answer: the pause may have been applied; a resume is harmless either way)
            if st == 200 and random.random() < 0.15:
                self.schedule(random.uniform(3, 15), "cancel", jid)
            else:
                self.schedule(random.uniform(5, 40), "resume", jid)

    def do_resume(self, jid, retry=0):
        c = self.ctx
        rec = self.jobs[jid]
        st, status, err = self._steer("resume", jid)
        rec["resumes"].append({"t": time.time(), "http": st, "status": status})
        c.journal.log("resume", job=jid, http=st, status_after=status, error=err, retry=retry)
        if (st == 0 or st >= 500) and retry < 10:
            self.schedule(3, "resume", jid, retry + 1)

    # -- polling --------------------------------------------------------------------------
    def note_job(self, j):
        with self.lock:
            rec = self.jobs.get(j.get("id"))
            if rec is None:
                return
            rec["status"] = j.get("status")
            ftm = j.get("fine_tuned_model")
            if j.get("status") == "succeeded" and ftm and rec["fine_tuned_model"] is None:
                rec["fine_tuned_model"] = ftm
                self.models.append(ftm)
                self.model_of[ftm] = rec["id"]

    def poll(self):
        c = self.ctx
        st, body = c.api.request("GET", "/v1/fine_tuning/jobs?limit=100", kind="GET /v1/fine_tuning/jobs")
        seen = set()
        if st == 200:
            for j in body.get("data", []):
                self.note_job(j)
                seen.add(j.get("id"))
        with self.lock:
            stale = [j for j, r in self.jobs.items() if r["status"] not in TERMINAL and j not in seen]
            some = random.sample(list(self.jobs), min(3, len(self.jobs)))
        for jid in stale[:10] + some:
            st, j = c.api.request("GET", f"/v1/fine_tuning/jobs/{jid}", kind="GET /v1/fine_tuning/jobs/{id}")
            if st == 200:
                self.note_job(j)
            elif st == 404:
                c.journal.anomaly("job_404", job=jid)
        if some:
            jid = random.choice(some)
            c.api.request("GET", f"/v1/fine_tuning/jobs/{jid}/events?limit=20",
                          kind="GET /v1/fine_tuning/jobs/{id}/events")
            st, ck = c.api.request("GET", f"/v1/fine_tuning/jobs/{jid}/checkpoints",
                                   kind="GET /v1/fine_tuning/jobs/{id}/checkpoints")
            if st == 200 and self.jobs[jid]["status"] == "succeeded":
                for ckpt in ck.get("data", []):
                    m = ckpt.get("fine_tuned_model_checkpoint")
                    with self.lock:
                        if m and m not in self.ckpt_models:
                            self.ckpt_models.append(m)
                            self.model_of[m] = jid
        if random.random() < 0.2:
            st, m = c.api.request("GET", "/v1/models", kind="GET /v1/models")
            if st == 200 and isinstance(m, dict):
                c.models_listed = len(m.get("data", []))
        if random.random() < 0.1:
            c.api.request("GET", "/v1/files?limit=100", kind="GET /v1/files")

    def infer(self):
        c = self.ctx
        with self.lock:
            models, ckpts = list(self.models), list(self.ckpt_models)
        texts = [r["text"] for r in random.sample(c.valid_rows, random.randint(1, 4))]
        if random.random() < 0.1 or not models:
            st, body = c.api.request("POST", "/v1/embeddings", {"model": BASE_MODEL, "input": texts},
                                     kind="POST /v1/embeddings")
            if st != 200 and 0 < st < 500:
                self.unexpected_inference("embeddings", BASE_MODEL, st, body)
            return
        model = random.choice(ckpts) if ckpts and random.random() < 0.2 else random.choice(models)
        st, body = c.api.request("POST", "/v1/classifications", {"model": model, "input": texts},
                                 kind="POST /v1/classifications" + (" (checkpoint)" if ":ckpt-step-" in model else ""))
        if st == 200:
            data = body.get("data", [])
            if len(data) != len(texts) or any(d.get("label") not in self.labels for d in data):
                self.unexpected_inference("classifications", model, st, body)
        elif 0 < st < 500:
            self.unexpected_inference("classifications", model, st, body)

    def unexpected_inference(self, what, model, st, body):
        rec = {"t": time.time(), "endpoint": what, "model": model, "status": st,
               "body": json.dumps(body)[:300]}
        self.inference_unexpected.append(rec)
        self.ctx.journal.anomaly("inference_unexpected", **rec)

    def follow_stream(self):
        """Follows one running job's event stream to its end ([DONE])."""
        c = self.ctx
        with self.lock:
            running = [j for j, r in self.jobs.items() if r["status"] in ("running", "queued")]
        if not running:
            return
        jid = random.choice(running)

        def run():
            t0 = time.time()
            outcome, lines = "error", 0
            try:
                conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=120)
                conn.request("GET", f"/v1/fine_tuning/jobs/{jid}/events?stream=true",
                             headers={"Authorization": "Bearer " + ADMIN_KEY})
                resp = conn.getresponse()
                c.stats.record("GET /v1/fine_tuning/jobs/{id}/events?stream=true", resp.status, t0, time.time(), None)
                if resp.status != 200:
                    outcome = f"http_{resp.status}"
                else:
                    outcome = "closed_before_done"
                    while time.time() - t0 < 900:
                        line = resp.readline()
                        if not line:
                            break
                        lines += 1
                        if line.strip() == b"data: [DONE]":
                            outcome = "done"
                            break
                conn.close()
            except Exception as e:
                outcome = "error: " + type(e).__name__
            with self.lock:
                self.streams[outcome.split(":")[0]] += 1
            c.journal.log("stream", job=jid, outcome=outcome, lines=lines, seconds=round(time.time() - t0, 1),
                          in_pg_window=overlaps_window(c, t0, time.time()))
        threading.Thread(target=run, name="stream", daemon=True).start()


def overlaps_window(ctx, t0, t1):
    for w in ctx.pg.windows + ([ctx.current_pg_fault] if ctx.current_pg_fault else []):
        if t0 <= w["end"] + PG_GRACE_S and t1 >= w["start"] - 1.0:
            return True
    return False


class Chaos:
    def __init__(self, ctx):
        self.ctx = ctx
        self.faults = []
        self.killable = [s for s in ctx.slot_names if s != "w0"] or list(ctx.slot_names)
        a = ctx.args
        start = ctx.t_start + ctx.warmup
        self.next = {
            "worker_kill9": start + random.uniform(*a.kill_every),
            "pg": start + random.uniform(30, 90),
            "worker_sigterm": start + random.uniform(*a.sigterm_every),
        }
        self.sigterm_threads = []

    def busy(self):
        rows = self.ctx.pg.try_query(
            "SELECT id, attempt, worker_id FROM fine_tuning_jobs WHERE state = 'running'")
        return rows or []

    def held_by(self, pid, busy):
        return [{"job": r["id"], "attempt": r["attempt"]} for r in busy if worker_pid(r["worker_id"]) == pid]

    def pick_worker(self):
        cl = self.ctx.cluster
        with cl.lock:
            alive = {s: cl.slots.get(s) for s in self.killable if cl.slots.get(s) is not None
                     and cl.slots[s].alive() and s not in cl.restart_at}
        if not alive:
            return None, None, []
        busy = self.busy()
        busy_slots = [s for s, inc in alive.items() if self.held_by(inc.pid, busy)]
        if busy_slots and random.random() < 0.85:
            slot = random.choice(busy_slots)
        else:
            slot = random.choice(list(alive))
        return slot, alive[slot], self.held_by(alive[slot].pid, busy)

    def tick(self):
        c = self.ctx
        now = time.time()
        a = c.args
        if now >= self.next["worker_kill9"]:
            self.next["worker_kill9"] = now + random.uniform(*a.kill_every)
            slot, inc, held = self.pick_worker()
            if inc:
                inc.signal(signal.SIGKILL, "kill9")
                inc.wait(10)
                inc.ended = time.time()
                delay = random.uniform(2, 15)
                c.cluster.schedule_restart(slot, delay)
                f = c.journal.log("fault", fault="worker_kill9", slot=slot, pid=inc.pid, held=held,
                                  restart_in_s=round(delay, 1))
                self.faults.append(f)
        if now >= self.next["worker_sigterm"]:
            self.next["worker_sigterm"] = now + random.uniform(*a.sigterm_every)
            slot, inc, held = self.pick_worker()
            if inc:
                inc.signal(signal.SIGTERM, "sigterm")
                f = c.journal.log("fault", fault="worker_sigterm", slot=slot, pid=inc.pid, held=held)
                self.faults.append(f)

                def waiter(slot=slot, inc=inc, f=f):
                    t0 = time.time()
                    rc = inc.wait(90)
                    took = round(time.time() - t0, 1)
                    f["rc"], f["exit_s"] = rc, took
                    c.journal.log("worker_sigterm_exit", slot=slot, pid=inc.pid, rc=rc, seconds=took)
                    if rc is None:
                        c.journal.anomaly("worker_did_not_exit_after_sigterm", slot=slot, pid=inc.pid)
                        inc.signal(signal.SIGKILL, "sigterm")
                        inc.wait(10)
                    elif rc != 0:
                        c.journal.anomaly("worker_sigterm_exit_code", slot=slot, pid=inc.pid, rc=rc,
                                          log_tail=tail(inc.log_path))
                    c.cluster.schedule_restart(slot, random.uniform(2, 10))
                th = threading.Thread(target=waiter, daemon=True)
                th.start()
                self.sigterm_threads.append(th)
        if now >= self.next["pg"]:
            self.next["pg"] = now + random.uniform(*a.pg_every)
            kind = random.choices(["pg_restart_fast", "pg_restart_immediate", "pg_outage"], [5, 3, 2])[0]
            down = random.uniform(3, 15) if kind == "pg_outage" else 0.0
            busy = self.busy()
            c.current_pg_fault = {"kind": kind, "start": time.time(), "end": time.time() + 3600}
            try:
                w = c.pg.fault(kind, down)
            finally:
                c.current_pg_fault = None
            f = c.journal.log("fault", fault=kind, window=w, running_jobs=[r["id"] for r in busy])
            self.faults.append(f)


def sample_rss(ctx):
    cl = ctx.cluster
    row = {"t": round(time.time() - ctx.t_start, 1)}
    if cl.serve is not None and cl.serve.alive():
        row["serve"] = mib(rss_kib(cl.serve.pid))
    with cl.lock:
        slots = dict(cl.slots)
    for s, inc in slots.items():
        if inc is not None and inc.alive():
            row[s] = mib(rss_kib(inc.pid))
            row[s + "_pid"] = inc.pid
    # GET /v1/models builds the whole list in memory: its size explains part of serve's RSS.
    row["models_listed"] = ctx.models_listed
    counts = ctx.pg.try_query(
        f"SELECT state, count(*) AS n FROM fine_tuning_jobs WHERE metadata->>'soak_run' = '{ctx.run_id}' GROUP BY state")
    if counts is not None:
        row["jobs"] = {r["state"]: r["n"] for r in counts}
    ctx.rss.append(row)
    ctx.journal.log("rss", **row)


def status_line(ctx):
    load = ctx.load
    with load.lock:
        states = collections.Counter(r["status"] for r in load.jobs.values())
    el = (time.time() - ctx.t_start) / 60
    faults = collections.Counter(f["fault"] for f in ctx.chaos.faults) if ctx.chaos else {}
    last = ctx.rss[-1] if ctx.rss else {}
    print(f"[soak] {el:5.1f} min  jobs {dict(states)}  faults {dict(faults)}  "
          f"serve {last.get('serve')} MiB  anomalies {len(ctx.journal.anomalies)}", flush=True)


# ---------------------------------------------------------------------------------------------
# Checks


def window_stats(series, key, t_end, window):
    pts = [(r["t"], r[key]) for r in series if r.get(key) is not None]
    if not pts:
        return None
    first = [v for t, v in pts if t <= window]
    second = [v for t, v in pts if window < t <= 2 * window]
    last = [v for t, v in pts if t >= t_end - window]
    mean = lambda xs: round(statistics.mean(xs), 1) if xs else None
    out = {"samples": len(pts), "first_mean": mean(first), "second_mean": mean(second),
           "last_mean": mean(last), "max": max(v for _, v in pts), "min": min(v for _, v in pts)}
    # Least-squares slope after the first window, in MiB per hour.
    tail_pts = [(t, v) for t, v in pts if t > window] or pts
    if len(tail_pts) >= 3:
        mt = statistics.mean(t for t, _ in tail_pts)
        mv = statistics.mean(v for _, v in tail_pts)
        den = sum((t - mt) ** 2 for t, _ in tail_pts)
        out["slope_mib_per_hour"] = round(sum((t - mt) * (v - mv) for t, v in tail_pts) / den * 3600, 1) if den else 0.0
    return out


def parse_worker_logs(ctx):
    """Per job, the intervals each worker process held it, from the workers' own logs:
    from `claimed job` to the end of the attempt (or the process's death)."""
    intervals = collections.defaultdict(list)
    unclosed = []
    end_msgs = {"job succeeded", "attempt ended", "job did not complete; discarding its outputs",
                "attempt lost its lease; recording nothing",
                "could not record the end of the attempt; the reaper will"}
    for inc in ctx.cluster.history:
        open_ = {}
        last_ts = inc.started
        try:
            f = open(inc.log_path, errors="replace")
        except OSError:
            continue
        with f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                ts = parse_ts(r.get("timestamp", ""))
                if ts is None:
                    continue
                last_ts = ts
                fields = r.get("fields", {})
                msg, job = fields.get("message"), fields.get("job")
                if msg == "claimed job" and job:
                    open_[job] = (ts, fields.get("attempt"))
                elif msg in end_msgs and job in open_:
                    start, attempt = open_.pop(job)
                    intervals[job].append({"pid": inc.pid, "slot": inc.name, "attempt": attempt,
                                           "start": start, "end": ts, "how": msg})
        for job, (start, attempt) in open_.items():
            end = inc.ended or last_ts
            how = "process " + (inc.end_reason or "exit")
            if inc.end_reason not in ("kill9",):
                unclosed.append({"job": job, "pid": inc.pid, "attempt": attempt})
            intervals[job].append({"pid": inc.pid, "slot": inc.name, "attempt": attempt,
                                   "start": start, "end": end, "how": how})
    return intervals, unclosed


def run_checks(ctx):
    c = ctx
    load = c.load
    inv = {}

    def check(name, ok, details=None, **extra):
        inv[name] = {"ok": bool(ok), "details": (details or [])[:200], **extra}
        if details and len(details) > 200:
            inv[name]["details_truncated"] = len(details)

    run = c.run_id
    jobs = c.pg.query(
        "SELECT id, state, attempt, failed_attempts, max_attempts, error, fine_tuned_model, "
        "cancel_requested_at IS NOT NULL AS cancel_requested, extract(epoch FROM created_at)::float8 AS created, "
        "extract(epoch FROM finished_at)::float8 AS finished, metadata->>'soak_n' AS n, result_files, model "
        f"FROM fine_tuning_jobs WHERE metadata->>'soak_run' = '{run}'")
    all_jobs_count = c.pg.query("SELECT count(*) AS n FROM fine_tuning_jobs")[0]["n"]
    # Messages one by one; metrics events (one a step) summed up per job, attempt and worker.
    events = c.pg.query(
        "SELECT e.job_id, e.seq, e.attempt, e.worker_id, e.type, e.message, NULL::bigint AS step, "
        "NULL::bigint AS max_step, 1 AS n, extract(epoch FROM e.created_at)::float8 AS t "
        "FROM fine_tuning_job_events e "
        f"JOIN fine_tuning_jobs j ON j.id = e.job_id WHERE j.metadata->>'soak_run' = '{run}' "
        "AND e.type = 'message' "
        "UNION ALL "
        "SELECT e.job_id, min(e.seq), e.attempt, e.worker_id, 'metrics', NULL, min(e.step), max(e.step), "
        "count(*), extract(epoch FROM max(e.created_at))::float8 FROM fine_tuning_job_events e "
        f"JOIN fine_tuning_jobs j ON j.id = e.job_id WHERE j.metadata->>'soak_run' = '{run}' "
        "AND e.type = 'metrics' GROUP BY e.job_id, e.attempt, e.worker_id "
        "ORDER BY 1, 2", timeout=600)
    metrics_events = sum(e["n"] for e in events if e["type"] == "metrics")
    checkpoints = c.pg.query(
        "SELECT c.job_id, c.attempt, c.step, c.storage_key, extract(epoch FROM c.created_at)::float8 AS t "
        f"FROM fine_tuning_job_checkpoints c JOIN fine_tuning_jobs j ON j.id = c.job_id "
        f"WHERE j.metadata->>'soak_run' = '{run}'")
    result_files = c.pg.query(
        "SELECT j.id AS job_id, f.id AS file_id, f.storage_key FROM fine_tuning_jobs j "
        f"LEFT JOIN files f ON f.id = j.result_files[1] WHERE j.metadata->>'soak_run' = '{run}' "
        "AND j.state = 'succeeded'")
    by_id = {j["id"]: j for j in jobs}
    ev_by_job = collections.defaultdict(list)
    for e in events:
        ev_by_job[e["job_id"]].append(e)
    ck_by_job = collections.defaultdict(list)
    for k in checkpoints:
        ck_by_job[k["job_id"]].append(k)

    # none lost
    lost, api_mismatch = [], []
    for jid, rec in load.jobs.items():
        if jid not in by_id:
            lost.append({"job": jid, "n": rec["n"]})
            continue
        st, j = c.api.request("GET", f"/v1/fine_tuning/jobs/{jid}", kind="GET /v1/fine_tuning/jobs/{id} (final)")
        if st != 200:
            api_mismatch.append({"job": jid, "http": st})
        elif j.get("status") != by_id[jid]["state"]:
            api_mismatch.append({"job": jid, "api": j.get("status"), "db": by_id[jid]["state"]})
    ghosts = [j["id"] for j in jobs if j["id"] not in load.jobs]
    check("none_lost", not lost and not api_mismatch and not ghosts,
          [{"lost": x} for x in lost] + [{"api": x} for x in api_mismatch] + [{"ghost": g} for g in ghosts],
          created=len(load.jobs), in_db=len(jobs), create_gave_up=load.create_failures,
          jobs_in_database_total=all_jobs_count)

    # terminal
    not_terminal = [{"job": j["id"], "state": j["state"]} for j in jobs if j["state"] not in TERMINAL]
    check("all_terminal", not not_terminal, not_terminal)

    # per-attempt analysis
    killed_pids = {f["pid"] for f in c.chaos.faults if f["fault"] == "worker_kill9"}
    termed_pids = {f["pid"] for f in c.chaos.faults if f["fault"] == "worker_sigterm"}
    windows = c.pg.windows
    concurrency, resume_bad, attempts_hist = [], [], collections.Counter()
    resumed_ok, resumed_scratch, attempts_info = 0, 0, {}
    for jid, evs in ev_by_job.items():
        per = collections.defaultdict(list)
        for e in evs:
            if e["attempt"] >= 1:
                per[e["attempt"]].append(e)
        claims = {}
        for a, es in per.items():
            for e in es:
                if e["message"] and e["message"].startswith("Fine-tuning job started"):
                    claims[a] = e
                    break
        final_attempt = by_id[jid]["attempt"] if jid in by_id else max(per or [0])
        attempts_hist[final_attempt] += 1
        missing = [a for a in range(1, final_attempt + 1) if a not in claims]
        if missing:
            concurrency.append({"job": jid, "problem": "missing claim events", "attempts": missing})
        info = {}
        for a in sorted(per):
            es = per[a]
            workers = {e["worker_id"] for e in es if e["worker_id"]}
            if len(workers) > 1:
                concurrency.append({"job": jid, "attempt": a, "problem": "several workers", "workers": sorted(workers)})
            last_t = max(e["t"] for e in es)
            cks = [k["t"] for k in ck_by_job.get(jid, []) if k["attempt"] == a]
            if cks:
                last_t = max(last_t, max(cks))
            nxt = claims.get(a + 1)
            if nxt and last_t >= nxt["t"]:
                concurrency.append({"job": jid, "attempt": a, "problem": "attempt wrote after the next began",
                                    "last_write": iso(last_t), "next_began": iso(nxt["t"])})
            end = "?"
            for e in es:
                m = e["message"] or ""
                if "stopped responding" in m:
                    end = "reaped"
                elif m.startswith(f"Attempt {a} failed"):
                    end = "failed_retry"
                elif m.startswith("The job was requeued"):
                    end = "shutdown_requeue"
                elif m.startswith("The job has been paused"):
                    end = "paused"
                elif m.startswith("The job has been cancelled"):
                    end = "cancelled"
                elif m.startswith("The job has successfully completed"):
                    end = "succeeded"
                elif m.startswith("Fine-tuning job failed"):
                    end = "failed"
                elif m.startswith("Attempt failed (") and m.endswith("job paused"):
                    end = "failed_paused"
            info[a] = {"worker": next(iter(workers), None), "start": claims[a]["t"] if a in claims else None,
                       "last": last_t, "end": end}
            # resume from the latest checkpoint
            metrics_steps = [e["step"] for e in es if e["type"] == "metrics" and e["step"] is not None]
            if a >= 2 and metrics_steps and a in claims:
                began = claims[a]["seq"]
                saved = [int(m.group(1)) for e in evs if e["seq"] < began and e["attempt"] < a
                         for m in [re.match(r"Checkpoint saved at step (\d+)$", e["message"] or "")] if m]
                latest = max(saved) if saved else None
                resumed = [int(m.group(1)) for e in es
                           for m in [re.match(r"Resumed from the checkpoint at step (\d+)", e["message"] or "")] if m]
                first_step = min(metrics_steps)
                if latest is None:
                    if resumed or first_step != 1:
                        resume_bad.append({"job": jid, "attempt": a, "latest_checkpoint": None,
                                           "resumed": resumed, "first_step": first_step})
                    else:
                        resumed_scratch += 1
                elif resumed != [latest] or first_step <= latest:
                    resume_bad.append({"job": jid, "attempt": a, "latest_checkpoint": latest,
                                       "resumed": resumed, "first_step": first_step})
                else:
                    resumed_ok += 1
        attempts_info[jid] = info

    # from the workers' logs: no two processes holding one job at once
    intervals, unclosed = parse_worker_logs(c)
    log_overlaps, max_overlap = [], 0.0
    for jid, ivs in intervals.items():
        ivs.sort(key=lambda x: x["start"])
        for prev, nxt in zip(ivs, ivs[1:]):
            overlap = prev["end"] - nxt["start"]
            if prev["pid"] != nxt["pid"]:
                max_overlap = max(max_overlap, overlap)
            # A release is logged just after its commit, and the next claim may be logged in
            # between: allow a second.
            if overlap > 1.0:
                log_overlaps.append({"job": jid, "first": {**prev, "start": iso(prev["start"]), "end": iso(prev["end"])},
                                     "second": {**nxt, "start": iso(nxt["start"]), "end": iso(nxt["end"])},
                                     "overlap_s": round(overlap, 3)})
    check("no_concurrent_attempts", not concurrency and not log_overlaps,
          concurrency + [{"log_overlap": x} for x in log_overlaps],
          events={"messages": sum(1 for e in events if e["type"] == "message"), "metrics": metrics_events},
          attempts_histogram={str(k): v for k, v in sorted(attempts_hist.items())},
          log_intervals=sum(len(v) for v in intervals.values()),
          max_log_overlap_s=round(max_overlap, 3), unclosed_log_intervals=unclosed[:20])

    # expected final state
    unexpected, races, failed_list, uncertain = [], [], [], 0
    outcome_counts = collections.Counter()
    for jid, rec in load.jobs.items():
        j = by_id.get(jid)
        if j is None:
            continue
        state = j["state"]
        cancel = rec["cancel"]
        if cancel and cancel["outcome"] == "accepted":
            expected = {"cancelled"}
            why = "cancel accepted (job was %s)" % cancel.get("status_after")
            category = "cancel accepted"
        elif cancel and cancel["outcome"] == "uncertain":
            expected = {"cancelled", "succeeded"}
            why = "cancel never got an answer"
            category = "cancel unanswered"
            uncertain += 1
        elif cancel and cancel["outcome"] == "refused":
            expected = {"succeeded"}
            why = "cancel refused: " + cancel.get("message", "")
            category = "cancel refused: job had ended (race)"
            races.append({"job": jid, "state": state, "message": cancel.get("message", "")})
        else:
            expected = {"succeeded"}
            why = "not cancelled"
            category = "not cancelled"
        if rec["pauses"]:
            category += ", paused"
        outcome_counts[f"{state} / {category}"] += 1
        if state == "failed":
            charged = []
            for a, i in sorted(attempts_info.get(jid, {}).items()):
                if i["end"] in ("reaped", "failed_retry", "failed"):
                    pid = worker_pid(i["worker"]) if i["worker"] else None
                    cause = None
                    if pid in killed_pids:
                        cause = "worker killed (kill -9)"
                    elif pid in termed_pids:
                        cause = "worker stopped (SIGTERM)"
                    else:
                        for w in windows:
                            if i["start"] and i["start"] <= w["end"] + PG_GRACE_S and i["last"] + LEASE_S >= w["start"]:
                                cause = f"PostgreSQL {w['kind']} at {iso(w['start'])}"
                                break
                    charged.append({"attempt": a, "ended": i["end"], "worker_pid": pid, "cause": cause})
            explained = bool(charged) and all(x["cause"] for x in charged) and \
                (j["error"] or {}).get("code") in ("worker_lost", "infrastructure_error")
            failed_list.append({"job": jid, "error": j["error"], "failed_attempts": j["failed_attempts"],
                                "max_attempts": j["max_attempts"], "charged_attempts": charged,
                                "explained": explained, "expected": sorted(expected)})
            if not explained:
                unexpected.append({"job": jid, "state": state, "expected": sorted(expected), "why": why,
                                   "error": j["error"]})
        elif state not in expected and state in TERMINAL:
            unexpected.append({"job": jid, "state": state, "expected": sorted(expected), "why": why,
                               "error": j["error"], "cancel_tries": rec["cancel_tries"]})
    check("expected_state", not unexpected, unexpected, races=races, failed=failed_list,
          cancel_uncertain=uncertain, outcomes=dict(outcome_counts))

    # checkpoints and models present
    root = os.path.join(c.data_dir, "artifacts")
    missing = []
    for k in checkpoints:
        p = os.path.join(root, k["storage_key"])
        if not os.path.isdir(p) or not any(os.scandir(p)):
            missing.append({"job": k["job_id"], "checkpoint_step": k["step"], "key": k["storage_key"]})
    for j in jobs:
        if j["state"] == "succeeded":
            p = os.path.join(root, "models", j["id"])
            if not os.path.isdir(p) or not os.path.exists(os.path.join(p, "config.json")):
                missing.append({"job": j["id"], "model_dir": p})
    for r in result_files:
        if not r["storage_key"] or not os.path.isfile(os.path.join(root, r["storage_key"])):
            missing.append({"job": r["job_id"], "result_file": r["file_id"]})
    # Scratch space of attempts (artifacts/tmp/{job}-attempt-{n}) left behind, e.g. by kill -9.
    tmp_root = os.path.join(root, "tmp")
    leftovers = sorted(e.name for e in os.scandir(tmp_root)) if os.path.isdir(tmp_root) else []
    tmp_bytes = 0
    for dirpath, _, files in os.walk(tmp_root):
        for fname in files:
            try:
                tmp_bytes += os.path.getsize(os.path.join(dirpath, fname))
            except OSError:
                pass
    store_bytes = 0
    for dirpath, _, files in os.walk(root):
        for fname in files:
            try:
                store_bytes += os.path.getsize(os.path.join(dirpath, fname))
            except OSError:
                pass
    check("checkpoints_present", not missing, missing, checkpoints=len(checkpoints),
          artifact_store_mib=round(store_bytes / 2 ** 20, 1),
          tmp_leftovers={"entries": len(leftovers), "mib": round(tmp_bytes / 2 ** 20, 1),
                         "sample": leftovers[:10]})
    check("resumed_from_latest", not resume_bad, resume_bad, resumed_from_checkpoint=resumed_ok,
          retried_from_scratch_without_checkpoint=resumed_scratch)

    # 5xx only while PostgreSQL was down
    outside = [b for b in c.stats.bad if not any(
        b["t0"] <= w["end"] + PG_GRACE_S and b["t1"] >= w["start"] - 1.0 for w in windows)]
    check("http_5xx_only_during_pg_faults", not outside, outside, total_5xx_or_refused=len(c.stats.bad))

    # inference on finished models: a final pass over a sample, then everything seen
    final = collections.Counter()
    with load.lock:
        sample = random.sample(load.models, min(40, len(load.models))) + \
            random.sample(load.ckpt_models, min(10, len(load.ckpt_models)))
    for m in sample:
        st, body = c.api.request("POST", "/v1/classifications", {"model": m, "input": ["the weather is sunny"]},
                                 kind="POST /v1/classifications (final)")
        final[str(st)] += 1
        if st != 200:
            load.unexpected_inference("classifications (final)", m, st, body)
    check("inference_ok", not load.inference_unexpected, load.inference_unexpected, final_pass=dict(final))

    # memory
    t_end = c.t_load_end - c.t_start
    win = min(600.0, max(60.0, t_end / 3))
    mem = {k: window_stats(c.rss, k, t_end, win) for k in ["serve"] + list(c.slot_names)}
    # The first window is the warm-up (allocator arenas, caches, models loading until the
    # serving memory budget is full): growth is judged from the second window to the last.
    not_flat = []
    for k in ["serve", "w0"]:
        m = mem.get(k)
        base = m and (m["second_mean"] or m["first_mean"])
        if base and m["last_mean"]:
            allowed = max(32.0, 0.25 * base)
            m["allowed_growth_mib"] = round(allowed, 1)
            if m["last_mean"] - base > allowed:
                not_flat.append({"process": k, **m})
    check("memory_flat", not not_flat, not_flat, window_s=win,
          rule="last-window mean <= second-window mean + max(32 MiB, 25 %); w1.. restart when killed")
    c.memory = mem
    return inv, jobs


def shutdown_all(ctx):
    """SIGTERM every kiln process; returns the problems."""
    cl = ctx.cluster
    problems = []
    ctx.final_shutdown.set()
    procs = [inc for inc in cl.slots.values() if inc is not None and inc.alive()]
    if cl.serve is not None and cl.serve.alive():
        procs.append(cl.serve)
    for inc in procs:
        inc.signal(signal.SIGTERM, "final_sigterm")
    for inc in procs:
        t0 = time.time()
        rc = inc.wait(90)
        ctx.journal.log("process_stop", name=inc.name, pid=inc.pid, rc=rc, seconds=round(time.time() - t0, 1))
        if rc is None:
            problems.append({"process": inc.name, "pid": inc.pid, "problem": "still running 90 s after SIGTERM"})
            inc.signal(signal.SIGKILL, "final_sigterm")
            inc.wait(10)
        elif rc != 0:
            problems.append({"process": inc.name, "pid": inc.pid, "problem": f"exit status {rc}",
                             "log_tail": tail(inc.log_path)})
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0, help="length of the load and faults")
    ap.add_argument("--out", default=None, help="JSON result path")
    ap.add_argument("--kiln", default="/tmp/kiln-soak", help="kiln binary (a copy, not a build output)")
    ap.add_argument("--workers", type=int, default=3, help="kiln worker processes (w0 is never killed)")
    ap.add_argument("--workdir", default=None, help="directory for everything (default: a new temp dir)")
    ap.add_argument("--log", default=None, help="JSONL log of actions and faults [workdir/soak-log.jsonl]")
    ap.add_argument("--pg-port", type=int, default=55432)
    ap.add_argument("--port", type=int, default=18480, help="kiln serve's port (first free from here)")
    ap.add_argument("--active-jobs", type=int, default=5, help="jobs kept queued or running")
    ap.add_argument("--cancel-fraction", type=float, default=0.2)
    ap.add_argument("--pause-fraction", type=float, default=0.07)
    ap.add_argument("--inference-rps", type=float, default=1.5)
    ap.add_argument("--kill-every", type=float, nargs=2, default=[50, 130], metavar=("MIN", "MAX"))
    ap.add_argument("--sigterm-every", type=float, nargs=2, default=[400, 800], metavar=("MIN", "MAX"))
    ap.add_argument("--pg-every", type=float, nargs=2, default=[150, 270], metavar=("MIN", "MAX"))
    ap.add_argument("--drain-minutes", type=float, default=10.0)
    ap.add_argument("--serve-memory", default="8MiB", help="KILN_SERVE_MEMORY (small: models get evicted)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory even when all is well")
    args = ap.parse_args()

    seed = args.seed if args.seed is not None else random.randrange(2 ** 31)
    random.seed(seed)
    if os.geteuid() != 0:
        sys.exit("run as root: PostgreSQL is run as the postgres user through runuser")
    if not os.access(args.kiln, os.X_OK):
        sys.exit(f"no kiln binary at {args.kiln}")

    c = Ctx()
    c.args = args
    c.kiln = args.kiln
    c.run_id = uuid.uuid4().hex[:10]
    c.workdir = args.workdir or tempfile.mkdtemp(prefix="kiln-soak-")
    os.makedirs(c.workdir, exist_ok=True)
    os.chmod(c.workdir, 0o755)
    c.data_dir = os.path.join(c.workdir, "data")
    c.models_dir = os.path.join(c.workdir, "models")
    c.logs = os.path.join(c.workdir, "logs")
    for d in (c.data_dir, c.models_dir, c.logs):
        os.makedirs(d, exist_ok=True)
    c.journal = Journal(args.log or os.path.join(c.workdir, "soak-log.jsonl"))
    c.stats = Stats()
    c.stop_load = threading.Event()
    c.stop_faults = threading.Event()
    c.stop_polls = threading.Event()
    c.final_shutdown = threading.Event()
    c.current_pg_fault = None
    c.models_listed = 0
    c.rss = []
    c.chaos = None
    c.slot_names = [f"w{i}" for i in range(args.workers)]
    c.memory = {}
    print(f"[soak] run {c.run_id} seed {seed}, work dir {c.workdir}, log {c.journal.path}", flush=True)
    c.journal.log("run_start", run=c.run_id, seed=seed, args=vars(args), kiln=c.kiln)

    c.train_rows = load_jsonl(os.path.join(REPO, "tests/data/topics-train.jsonl"))
    c.valid_rows = load_jsonl(os.path.join(REPO, "tests/data/topics-valid.jsonl"))
    vocab = []
    for r in c.train_rows + c.valid_rows:
        for w in words_of(r["text"]) + words_of("the weather is sunny"):
            if w not in vocab:
                vocab.append(w)
    model_info = write_tiny_bert(os.path.join(c.models_dir, BASE_MODEL), vocab)
    c.journal.log("model_written", model=BASE_MODEL, **model_info)

    c.pg = Postgres(os.path.join(c.workdir, "pg"), free_port(args.pg_port), c.journal)
    c.pg.init()
    c.pg.start()
    c.pg.psql("CREATE DATABASE kiln", db="postgres")
    c.journal.log("postgres_started", port=c.pg.port, bin=c.pg.bin)

    r = subprocess.run([c.kiln, "models", "list", "--local"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, KILN_MODELS_DIR=c.models_dir, KILN_DATA_DIR=c.data_dir))
    c.journal.log("models_list_local", rc=r.returncode, stdout=r.stdout[-2000:], stderr=r.stderr[-2000:])
    print(r.stdout.strip(), flush=True)
    if r.returncode != 0 or BASE_MODEL not in r.stdout:
        sys.exit(f"kiln models list --local does not list {BASE_MODEL}: {r.stdout} {r.stderr}")

    c.port = free_port(args.port)
    c.api = Api(c.port, ADMIN_KEY, c.stats)
    c.cluster = Cluster(c)
    exit_code = 1
    result = {}
    try:
        c.cluster.start_serve()
        for s in c.slot_names:
            c.cluster.start_worker(s)
        st, models = c.api.request("GET", "/v1/models", kind="GET /v1/models")
        ids = [m.get("id") for m in (models or {}).get("data", [])] if st == 200 else []
        if BASE_MODEL not in ids:
            raise RuntimeError(f"GET /v1/models does not list {BASE_MODEL}: {st} {models}")
        c.journal.log("server_ready", port=c.port, models=ids)

        c.load = load = Load(c)
        for size in (400, 800, 1200, 1600):
            load.upload_training_file(size)
        load.upload_training_file(80, validation=True)
        load.upload_training_file(160, validation=True)
        deadline = time.time() + 120
        while time.time() < deadline and load.pending_files:
            load.check_pending_files()
            time.sleep(0.5)
        if not load.files:
            raise RuntimeError("no training file was processed")

        c.t_start = time.time()
        c.warmup = min(120.0, args.minutes * 60 * 0.1)
        t_stop = c.t_start + args.minutes * 60
        c.chaos = chaos = Chaos(c)
        threads = []
        threads.append(loop_thread(c, "supervisor", c.cluster.supervise_once, c.final_shutdown, 1.0))
        threads.append(loop_thread(c, "rss", lambda: sample_rss(c), c.final_shutdown, 30.0))
        threads.append(loop_thread(c, "actions", load.run_actions, c.stop_polls, 0.5))
        threads.append(loop_thread(c, "poll", load.poll, c.stop_polls, 2.0))
        threads.append(loop_thread(c, "infer", load.infer, c.stop_polls,
                                   lambda: random.expovariate(args.inference_rps)))
        threads.append(loop_thread(c, "files", load.check_pending_files, c.stop_polls, 2.0))
        threads.append(loop_thread(c, "status", lambda: status_line(c), c.final_shutdown, 60.0))
        chaos_thread = loop_thread(c, "chaos", chaos.tick, c.stop_faults, 1.0)

        def submit():
            if load.active_count() < args.active_jobs:
                load.create_job()
            if random.random() < 0.04:
                v = random.random() < 0.2
                load.upload_training_file(random.choice([80, 160] if v else [300, 600, 1000, 1600]), validation=v)
            if random.random() < 0.02:
                load.follow_stream()
        submitter = loop_thread(c, "submit", submit, c.stop_load, lambda: random.uniform(1.5, 5))

        while time.time() < t_stop:
            time.sleep(1)
        c.t_load_end = time.time()
        print("[soak] load over: stopping faults and submissions, draining", flush=True)
        c.journal.log("load_end")
        c.stop_load.set()
        c.stop_faults.set()
        submitter.join(120)
        chaos_thread.join(600)
        for th in chaos.sigterm_threads:
            th.join(120)
        # every worker up again
        deadline = time.time() + 120
        while time.time() < deadline and any(c.cluster.slots.get(s) is None or not c.cluster.slots[s].alive()
                                              for s in c.slot_names):
            time.sleep(1)
        # pending resumes now; drop pending cancels and pauses
        with load.lock:
            load.actions = [(time.time(), s, a, j, r) for t, s, a, j, r in load.actions
                            if a == "resume" or (a == "cancel" and r > 0)]
            heapq.heapify(load.actions)
        time.sleep(3)
        paused = c.pg.query(f"SELECT id FROM fine_tuning_jobs WHERE state = 'paused' AND metadata->>'soak_run' = '{c.run_id}'")
        for p in paused:
            c.journal.log("drain_resume", job=p["id"])
            load.do_resume(p["id"])
        drain_deadline = time.time() + args.drain_minutes * 60
        while time.time() < drain_deadline:
            rows = c.pg.query(f"SELECT state, count(*) AS n FROM fine_tuning_jobs WHERE metadata->>'soak_run' = '{c.run_id}' GROUP BY state")
            left = sum(r["n"] for r in rows if r["state"] not in TERMINAL)
            if left == 0:
                break
            if any(r["state"] == "paused" for r in rows):
                for p in c.pg.query(f"SELECT id FROM fine_tuning_jobs WHERE state = 'paused' AND metadata->>'soak_run' = '{c.run_id}'"):
                    c.journal.anomaly("paused_during_drain", job=p["id"])
                    load.do_resume(p["id"])
            time.sleep(5)
        c.t_drained = time.time()
        c.journal.log("drained", seconds=round(c.t_drained - c.t_load_end, 1))
        print(f"[soak] drained in {c.t_drained - c.t_load_end:.0f} s; checking", flush=True)
        c.stop_polls.set()
        time.sleep(2)
        load.poll()
        sample_rss(c)

        inv, jobs = run_checks(c)
        problems = shutdown_all(c)
        unexpected_exits = [i.info() for i in c.cluster.history + c.cluster.serves if i.end_reason == "unexpected"]
        inv["processes_ok"] = {"ok": not problems and not unexpected_exits,
                               "details": problems + unexpected_exits}
        c.pg.ctl("stop", "-m", "fast")

        by_state = collections.Counter(j["state"] for j in jobs)
        faults = collections.Counter(f["fault"] for f in chaos.faults)
        kills_hit = sum(1 for f in chaos.faults if f["fault"] == "worker_kill9" and f["held"])
        req_total = collections.Counter()
        for kind, cnt in c.stats.counts.items():
            for s, n in cnt.items():
                req_total[s] += n
        ok = all(v["ok"] for v in inv.values())
        result = {
            "run": {"id": c.run_id, "seed": seed, "started": iso(c.t_start), "load_minutes": args.minutes,
                    "drain_seconds": round(c.t_drained - c.t_load_end, 1), "kiln": c.kiln,
                    "workers": args.workers, "serve_memory": args.serve_memory, "workdir": c.workdir,
                    "log": c.journal.path, "model": {"id": BASE_MODEL, **model_info},
                    "machine": {"cpus": os.cpu_count()}, "args": vars(args)},
            "ok": ok,
            "jobs": {"created": len(load.jobs), "by_final_state": dict(by_state),
                     "outcomes": inv["expected_state"]["outcomes"],
                     "cancel_requests": sum(1 for r in load.jobs.values() if r["cancel_tries"]),
                     "cancel_races": len(inv["expected_state"]["races"]),
                     "paused": sum(1 for r in load.jobs.values() if any(p["http"] == 200 for p in r["pauses"])),
                     "by_strategy": dict(collections.Counter(r["hp"]["strategy"] for r in load.jobs.values())),
                     "from_fine_tuned_model": sum(1 for r in load.jobs.values() if r["model"] != BASE_MODEL),
                     "attempts_histogram": inv["no_concurrent_attempts"]["attempts_histogram"],
                     "checkpoints": inv["checkpoints_present"]["checkpoints"],
                     "resumed_from_checkpoint": inv["resumed_from_latest"]["resumed_from_checkpoint"],
                     "failed": inv["expected_state"]["failed"],
                     "files_uploaded": len(load.files) + len(load.valid_files)},
            "faults": {"by_kind": dict(faults), "kill9_that_hit_a_running_job": kills_hit,
                       "pg_windows": c.pg.windows, "list": chaos.faults},
            "requests": {"by_status": dict(req_total),
                         "by_endpoint": {k: dict(v) for k, v in sorted(c.stats.counts.items())},
                         "5xx_or_refused": c.stats.bad, "streams": dict(load.streams)},
            "rss_mib": {"summary": c.memory, "series": c.rss},
            "invariants": inv,
            "anomalies": c.journal.anomalies,
            "script_errors": [e["where"] for e in c.journal.script_errors],
        }
        print_summary(result)
        exit_code = 0 if ok else 1
    except Exception:
        c.journal.script_error("main")
        result = result or {"ok": False, "error": traceback.format_exc()}
        exit_code = 2
    finally:
        c.final_shutdown.set()
        c.stop_polls.set()
        c.stop_faults.set()
        c.stop_load.set()
        for inc in list(c.cluster.slots.values()) + [c.cluster.serve]:
            if inc is not None and inc.alive():
                inc.signal(signal.SIGKILL, "cleanup")
                inc.wait(10)
        try:
            c.pg.ctl("stop", "-m", "immediate", timeout=60)
        except Exception:
            pass
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1, default=str)
            print(f"[soak] result written to {args.out}", flush=True)
        c.journal.log("run_end", exit_code=exit_code)
        if exit_code == 0 and not args.keep and not args.workdir:
            # keep the log and the kiln logs, drop the database and the artifacts
            shutil.rmtree(os.path.join(c.workdir, "pg"), ignore_errors=True)
            shutil.rmtree(c.data_dir, ignore_errors=True)
        print(f"[soak] log: {c.journal.path}; kiln logs: {c.logs}", flush=True)
    sys.exit(exit_code)


def print_summary(r):
    j, f, q, inv = r["jobs"], r["faults"], r["requests"], r["invariants"]
    print("\n==================== kiln soak ====================")
    print(f"load {r['run']['load_minutes']} min, drain {r['run']['drain_seconds']} s, "
          f"{r['run']['workers']} workers, run {r['run']['id']} seed {r['run']['seed']}")
    print(f"jobs created        {j['created']}   by final state: {j['by_final_state']}")
    for k, v in sorted(j["outcomes"].items()):
        print(f"   {v:5d}  {k}")
    print(f"cancel requests     {j['cancel_requests']} (races lost to the end: {j['cancel_races']}), "
          f"paused {j['paused']}, on a fine-tuned model {j['from_fine_tuned_model']}")
    print(f"attempts per job    {j['attempts_histogram']}")
    print(f"checkpoints         {j['checkpoints']}, attempts resumed from one: {j['resumed_from_checkpoint']}")
    print(f"faults              {f['by_kind']} (kill -9 that hit a running job: {f['kill9_that_hit_a_running_job']})")
    print(f"requests by status  {q['by_status']}   streams {q['streams']}")
    for k, v in q["by_endpoint"].items():
        print(f"   {k:55s} {v}")
    print("RSS (MiB)           first-window / second-window / last-window mean, max, slope after the first window")
    for k, m in r["rss_mib"]["summary"].items():
        if m:
            print(f"   {k:6s} {m['first_mean']} / {m['second_mean']} / {m['last_mean']}, max {m['max']}, "
                  f"{m.get('slope_mib_per_hour')} MiB/h")
    print("invariants")
    for k, v in inv.items():
        print(f"   {'ok  ' if v['ok'] else 'FAIL'}  {k}" + ("" if v["ok"] else f"  {json.dumps(v['details'][:5], default=str)[:1500]}"))
    print(f"anomalies           {len(r['anomalies'])}; script errors {len(r['script_errors'])}")
    print("===================================================\n", flush=True)


if __name__ == "__main__":
    main()
