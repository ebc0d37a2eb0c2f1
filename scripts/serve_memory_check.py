#!/usr/bin/env python3
"""Does `kiln serve` give memory back after a peak? Starts a server (no workers) on its own
database, sends bursts of embedding requests to a real encoder, and prints RSS at the start,
after each burst and 75 s later (after the once-a-minute malloc_trim).

    python3 scripts/serve_memory_check.py --kiln target/debug/kiln \
        --models ~/.cache/kiln-models --database postgres://postgres@127.0.0.1:5432/postgres
"""
import argparse
import json
import os
import subprocess
import tempfile
import time
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--kiln", required=True)
ap.add_argument("--models", required=True, help="models dir holding --model")
ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
ap.add_argument("--database", required=True, help="a PostgreSQL URL whose role may CREATE DATABASE")
ap.add_argument("--bursts", type=int, default=6)
ap.add_argument("--inputs", type=int, default=48)
args = ap.parse_args()

db = "kiln_serve_memory_check"
admin = args.database
subprocess.run(["psql", "-q", admin, "-c", f"DROP DATABASE IF EXISTS {db}", "-c", f"CREATE DATABASE {db}"],
               check=True, capture_output=True)
url = admin.rsplit("/", 1)[0] + "/" + db
port = 18098
env = dict(os.environ, DATABASE_URL=url, KILN_DATA_DIR=tempfile.mkdtemp(), KILN_MODELS_DIR=args.models,
           KILN_ADMIN_KEY="sk-memory-check", KILN_WORKERS="0", KILN_ADDR=f"127.0.0.1:{port}", RUST_LOG="warn")
server = subprocess.Popen([args.kiln, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rss_mib():
    with open(f"/proc/{server.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    return None


try:
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            break
        except Exception:
            time.sleep(0.2)
    t0 = time.time()
    series = [("start", 0, rss_mib())]
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    for i in range(args.bursts):
        body = json.dumps({"model": args.model, "input": [text] * args.inputs}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/embeddings", data=body, headers={
            "Authorization": "Bearer sk-memory-check", "Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=300).read()
        series.append((f"after burst {i + 1}", round(time.time() - t0), rss_mib()))
    while time.time() - t0 < 75:
        time.sleep(5)
    series.append(("75 s after start", round(time.time() - t0), rss_mib()))
    for label, at, mib in series:
        print(f"{label:>18} (t={at:>3} s): {mib} MiB")
finally:
    server.terminate()
    server.wait()
    subprocess.run(["psql", "-q", admin, "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"], capture_output=True)
