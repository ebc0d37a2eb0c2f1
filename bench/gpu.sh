#!/usr/bin/env bash
# Issue 9's GPU measurement in one command: kiln and PyTorch fine-tuning the same models at the
# same batch size and precision (f32) on the same GPU, one after the other, with the model FLOP
# utilisation (MFU) each reaches.
#
#   On the GPU machine (no Rust, no network; python3 with torch (CUDA) and transformers):
#     bash bench/gpu.sh KILN MINILM_DIR
#   Here, first, to make what travels there (the device tool carries at most 64 MiB):
#     bash bench/gpu.sh --pack KILN MINILM_DIR [DEST]     # DEST: .gpucarry in the repo
#     then: bash bench/gpu.sh .gpucarry/kiln.xz .gpucarry/minilm   (carry .gpucarry)
#
# KILN        the kiln binary built with `--features cuda` (scripts/build-cuda.sh), or that
#             binary compressed with xz (`KILN.xz`, unpacked to a temporary directory)
# MINILM_DIR  all-MiniLM-L6-v2 in Hugging Face layout (config.json, tokenizer files). Its
#             weights: model.safetensors as it is; else model.f16.safetensors (what --pack
#             writes: the real weights in f16, 43 MiB instead of 87), widened back to f32; else
#             none: random weights of the same shapes (seeded; throughput is the same, the
#             validation accuracy in the JSON is then meaningless).
#
# What it runs (both with --device cuda: kiln gets `--device cuda:0` and mixed_precision=fp32; PyTorch in f32 with TF32
# off, plus one configuration with TF32 on):
#  0. bench/gpu_check.py: does the CUDA build work? `kiln check-device` (one training step of every
#     family on the GPU and on the CPU, every gradient compared), kiln train on the GPU for every family (text
#     classification in f32 and bf16, decoder LoRA SFT, ResNet and ViT image classification),
#     kiln predict (the serving engine) on the GPU against the CPU, and a batch too large for
#     the GPU failing with a message about memory. About 2 minutes; pass/fail per check.
#  1. bench/train_minilm.py: all-MiniLM-L6-v2 full fine-tuning (sequence classification),
#     batch $MINILM_BATCH (16), max_length 32, $MINILM_EXAMPLES (3200) examples = 200 steps,
#     steps 1..5 untimed: kiln full, kiln full (candle ops: KILN_DEVICE_KERNELS=candle,
#     what kiln's CUDA kernels are worth), torch full (default), torch full (best: fused
#     AdamW), torch full (best, tf32). Figure: examples/s, kiln / torch ratios.
#  2. bench/decoder.py --only sft --strategy lora: a random Qwen2-shaped decoder (hidden 768,
#     12 layers, 12/4 heads, intermediate 2048, byte vocabulary: 75.7 M parameters), LoRA rank 8
#     on q_proj,v_proj, batch $DECODER_BATCH (8), max_length 256, $DECODER_EXAMPLES (800)
#     chat examples = 100 steps, steps 1..5 untimed: kiln, kiln (candle ops), torch (default),
#     torch (best), torch (best, tf32). Figure: tokens/s, kiln / torch ratios.
#  Both print MFU lines (formula in bench/gpu_util.py) against the card's dense FP32 and TF32
#  peaks (H100 SXM/H200: 67 / 494.7 TFLOP/s; H100 PCIe: 51 / 378; other cards: n/a).
#
# Results: $OUT if set (the device tool brings back what is written there), else bench/results:
#   gpu-bench-STAMP.log, gpu-check-STAMP.json, gpu-train-minilm-STAMP.json,
#   gpu-decoder-STAMP.json (STAMP: date and time)
# Expected wall time on an H100: about 7 minutes; the timeouts below bound it at about 12
# (CHECK_TIMEOUT 180 s + MINILM_TIMEOUT 240 s + DECODER_TIMEOUT 270 s + set-up; CHILD_TIMEOUT
# 90 s per process). The device tool allows 600 s per command: to stay inside it whatever
# happens, run the checks alone first (SKIP_MINILM=1 SKIP_DECODER=1), then the benchmarks
# (SKIP_CHECK=1; at most 510 s + set-up, or one per call with SKIP_DECODER=1 / SKIP_MINILM=1)
# on the still-warm machine.
# A failing configuration is recorded (JSON "errors", log) and the others still run; the exit
# status is then 1. Missing libraries, GPU or --device support stop it at once, before any run.
#
# DEVICE=cpu runs the same plumbing on the CPU (no GPU checks; a smoke test of this script with a
# CPU build, e.g. DEVICE=cpu MINILM_EXAMPLES=160 DECODER_EXAMPLES=64 DECODER_SHAPE=' ').
#
# Environment (optional): PYTHON (python3), REPEATS (1), THREADS (4), MINILM_BATCH,
# MINILM_EXAMPLES, DECODER_BATCH, DECODER_EXAMPLES, DECODER_SHAPE (the decoder.py shape
# options), CHILD_TIMEOUT, CHECK_TIMEOUT, MINILM_TIMEOUT, DECODER_TIMEOUT, SKIP_CHECK=1,
# SKIP_MINILM=1, SKIP_DECODER=1.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
STAMP=$(date +%Y-%m-%d-%H%M%S)

die() {
    echo "gpu.sh: ERROR: $*" >&2
    exit 1
}

usage() {
    sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------
# --pack (here): the kiln binary xz-compressed and MiniLM without its f32 weights (f16 instead,
# when everything fits the device tool's 64 MiB), into DEST, which git is told to ignore.

pack() {
    [ $# -ge 2 ] || usage
    local kiln=$1 minilm=$2 dest=${3:-$REPO/.gpucarry}
    [ -f "$kiln" ] || die "$kiln: no such file"
    [ -f "$minilm/config.json" ] || die "$minilm: no config.json (not a Hugging Face model directory)"
    command -v xz >/dev/null || die "xz is needed for --pack"
    case $dest in /*) ;; *) dest=$PWD/$dest ;; esac
    rm -rf "$dest"
    # What else travels: the tracked and untracked, not ignored files of the repo (DEST is gone).
    local tree
    tree=$(cd "$REPO" && git ls-files -co --exclude-standard -z |
        "$PY" -c 'import os, sys; print(sum(os.path.getsize(f) for f in sys.stdin.read().split("\0") if os.path.isfile(f)))')
    mkdir -p "$dest/minilm"
    echo "compressing $kiln ($(du -h "$kiln" | cut -f1)) ..."
    xz -T0 -6 -c "$kiln" >"$dest/kiln.xz"
    (cd "$minilm" && tar cf - --exclude=model.safetensors --exclude='*.f16.safetensors' .) | (cd "$dest/minilm" && tar xf -)
    local have f16_est budget=$((62 * 1024 * 1024))
    have=$(du -sb "$dest" | cut -f1)
    f16_est=0
    [ -f "$minilm/model.safetensors" ] && f16_est=$(($(stat -c %s "$minilm/model.safetensors") / 2))
    if [ "$f16_est" -gt 0 ] && [ $((tree + have + f16_est)) -le "$budget" ]; then
        "$PY" - "$minilm/model.safetensors" "$dest/minilm/model.f16.safetensors" <<'PY'
import sys
import numpy as np
from safetensors.numpy import load_file, save_file
t = load_file(sys.argv[1])
save_file({k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in t.items()}, sys.argv[2])
PY
        echo "MiniLM weights: f16 copy (widened back to f32 on the GPU machine)"
    else
        echo "MiniLM weights: none packed (tree $tree + pack $have + f16 $f16_est bytes > $budget):" \
            "random weights of the same shapes will be made on the GPU machine"
    fi
    {
        echo "packed: $(date -Iseconds)"
        echo "git_head: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo '?')"
        echo "git_dirty_files: $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | wc -l)"
        echo "kiln: $kiln"
        echo "kiln_sha256: $(sha256sum "$kiln" | cut -d' ' -f1)"
        echo "kiln_modified: $(date -r "$kiln" -Iseconds)"
        echo "minilm: $minilm"
    } >"$dest/info.txt"
    if [[ $dest == "$REPO"/* ]]; then
        local rel=${dest#"$REPO"/} exclude
        exclude=$(cd "$REPO" && git rev-parse --git-path info/exclude)
        case $exclude in /*) ;; *) exclude=$REPO/$exclude ;; esac
        mkdir -p "$(dirname "$exclude")"
        grep -qxF "/$rel/" "$exclude" 2>/dev/null || echo "/$rel/" >>"$exclude"
        echo "wrote $dest ($(du -sh "$dest" | cut -f1); repo tree $((tree / 1024)) KiB); /$rel/ is in $exclude"
        echo "device command (carry [\"$rel\"], timeout_s 600):"
        echo "  bash bench/gpu.sh $rel/kiln.xz $rel/minilm"
    else
        echo "wrote $dest ($(du -sh "$dest" | cut -f1))"
    fi
}

if [ "${1:-}" = "--pack" ]; then
    shift
    pack "$@"
    exit 0
fi
case ${1:-} in -h | --help | "") usage ;; esac

# ---------------------------------------------------------------------------------------------
# The measurement (on the GPU machine)

KILN_ARG=$1
MINILM_ARG=${2:-${MINILM_DIR:-}}
[ -n "$MINILM_ARG" ] || usage
OUTDIR=${OUT:-$REPO/bench/results}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/gpu-bench-$STAMP.log
WORK=$(mktemp -d /tmp/kiln-gpu-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

DEVICE=${DEVICE:-cuda}
REPEATS=${REPEATS:-1}
THREADS=${THREADS:-4}
CHILD_TIMEOUT=${CHILD_TIMEOUT:-90}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-180}
MINILM_TIMEOUT=${MINILM_TIMEOUT:-240}
DECODER_TIMEOUT=${DECODER_TIMEOUT:-270}
MINILM_BATCH=${MINILM_BATCH:-16}
MINILM_EXAMPLES=${MINILM_EXAMPLES:-3200}
DECODER_BATCH=${DECODER_BATCH:-8}
DECODER_EXAMPLES=${DECODER_EXAMPLES:-800}
DECODER_SHAPE=${DECODER_SHAPE:---hidden-size 768 --layers 12 --heads 12 --kv-heads 4 --intermediate-size 2048 --init-std 0.02}

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export KILN_LOG=${KILN_LOG:-warn}

preflight() {
    echo "== bench/gpu.sh $(date -Iseconds) on $(uname -n), $(nproc) cores"
    [ -f "$(dirname "$KILN_ARG")/info.txt" ] && sed 's/^/  pack /' "$(dirname "$KILN_ARG")/info.txt"

    if [ "$DEVICE" = cpu ]; then
        echo "DEVICE=cpu: no GPU checks (a smoke test of this script)"
        "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' ||
            die "$PY needs torch and transformers"
    else
        command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver on this machine"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv ||
            die "nvidia-smi failed: the GPU or its driver is not usable"
        "$PY" -c 'import torch, transformers; assert torch.cuda.is_available(), "torch sees no GPU"; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "|", torch.cuda.get_device_name(0))' ||
            die "$PY needs torch with CUDA (and transformers), and a GPU it can see"
    fi

    # The kiln binary (unpacked if compressed).
    [ -f "$KILN_ARG" ] || die "$KILN_ARG: no such file (the kiln binary built with --features cuda)"
    case $KILN_ARG in
    *.xz)
        KILN=$WORK/bin/kiln
        mkdir -p "$WORK/bin"
        if command -v xz >/dev/null; then
            xz -dc "$KILN_ARG" >"$KILN"
        else
            "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$KILN_ARG" "$KILN"
        fi
        ;;
    *) KILN=$(cd "$(dirname "$KILN_ARG")" && pwd)/$(basename "$KILN_ARG") ;;
    esac
    chmod +x "$KILN" 2>/dev/null || true
    echo "kiln: $KILN ($(du -h "$KILN" | cut -f1), sha256 $(sha256sum "$KILN" | cut -c1-16)...)"

    # The CUDA libraries kiln links (PyTorch's copies, in its Python's site-packages) ...
    local dirs
    dirs=$("$PY" - <<'PY'
import glob, os, site, sys
roots = []
for p in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    if p and os.path.isdir(p) and p not in roots:
        roots.append(p)
found = []
for lib in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10"):
    hit = None
    for r in roots:
        for sub in ("nvidia", "torch/lib", "cuda", ""):
            base = os.path.join(r, sub) if sub else r
            if not os.path.isdir(base):
                continue
            pat = os.path.join(base, "**", lib) if sub else os.path.join(base, lib)
            m = sorted(glob.glob(pat, recursive=bool(sub)))
            if m:
                hit = m[0]
                break
        if hit:
            break
    print(f"  {lib}: {hit or 'NOT FOUND under ' + ', '.join(roots)}", file=sys.stderr)
    if hit and os.path.dirname(hit) not in found:
        found.append(os.path.dirname(hit))
print(":".join(found))
PY
)
    # ... and the driver's libcuda.so.1 (normally on the loader's path already).
    if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
        local d
        for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/compat /usr/local/cuda/lib64; do
            if [ -e "$d/libcuda.so.1" ]; then
                dirs=${dirs:+$dirs:}$d
                break
            fi
        done
    fi
    export LD_LIBRARY_PATH=$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    if command -v ldd >/dev/null; then
        local deps
        deps=$(ldd "$KILN" 2>&1) || die "ldd $KILN failed:"$'\n'"$deps"
        echo "$deps" | grep -E 'libcuda|libcudart|libcublas|libcurand|not found' | sed 's/^/  /' || true
        if echo "$deps" | grep -q 'not found'; then
            die "the kiln binary cannot load these libraries:"$'\n'"$(echo "$deps" | grep 'not found')"$'\n'"searched the site-packages of $PY for the CUDA 13 runtime libraries (found dirs: ${dirs:-none}) and the usual driver directories for libcuda.so.1 (the NVIDIA driver's); install PyTorch's cu13 wheels or set LD_LIBRARY_PATH"
        fi
        if [ "$DEVICE" != cpu ]; then
            echo "$deps" | grep -q 'libcuda\.so\.1' ||
                die "the kiln binary does not link libcuda.so.1: not a --features cuda build (scripts/build-cuda.sh)"
        fi
    else
        echo "gpu.sh: warning: no ldd here; the library check is kiln --version starting below"
    fi
    "$KILN" --version || die "$KILN does not start (see above: a missing library?)"
    local help
    help=$("$KILN" train --help 2>&1) || die "$KILN train --help failed:"$'\n'"$help"
    [[ $help == *--device* ]] ||
        die "$KILN has no 'train --device' option: rebuild it from a tree with the --device flag"

    # MiniLM: as is, widened from f16, or random weights of the same shapes.
    [ -f "$MINILM_ARG/config.json" ] || die "$MINILM_ARG: no config.json (all-MiniLM-L6-v2 in Hugging Face layout)"
    MINILM=$MINILM_ARG
    if [ ! -f "$MINILM_ARG/model.safetensors" ]; then
        MINILM=$WORK/minilm
        mkdir -p "$MINILM"
        (cd "$MINILM_ARG" && tar cf - --exclude='*.f16.safetensors' .) | (cd "$MINILM" && tar xf -)
        "$PY" - "$MINILM_ARG" "$MINILM" <<'PY'
import os, sys
src, dst = sys.argv[1], sys.argv[2]
f16 = os.path.join(src, "model.f16.safetensors")
if os.path.exists(f16):
    import numpy as np
    from safetensors.numpy import load_file, save_file
    t = load_file(f16)
    save_file({k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in t.items()},
              os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    print("MiniLM weights: the real ones, via f16 (rounded to f16, widened to f32)")
else:
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    BertModel(BertConfig.from_json_file(os.path.join(src, "config.json"))).save_pretrained(dst, safe_serialization=True)
    print("MiniLM weights: RANDOM (seed 0, BERT initialisation), same shapes: throughput only,"
          " the validation accuracy is meaningless")
PY
    fi
    echo "MiniLM: $MINILM"
}

run_check() {
    echo
    echo "== 0/2 does the CUDA build work? (bench/gpu_check.py --device $DEVICE)"
    timeout -k 10 "$CHECK_TIMEOUT" "$PY" "$REPO/bench/gpu_check.py" \
        --kiln "$KILN" --minilm "$MINILM" --device "$DEVICE" --timeout "$CHILD_TIMEOUT" \
        --out "$OUTDIR/gpu-check-$STAMP.json"
}

run_minilm() {
    echo
    echo "== 1/2 MiniLM full fine-tuning (bench/train_minilm.py --device $DEVICE)"
    timeout -k 10 "$MINILM_TIMEOUT" "$PY" "$REPO/bench/train_minilm.py" \
        --model "$MINILM" --kiln "$KILN" --device "$DEVICE" --torch-tf32 --keep-going \
        --timeout "$CHILD_TIMEOUT" --repeats "$REPEATS" --threads "$THREADS" \
        --train-examples "$MINILM_EXAMPLES" --batch-size "$MINILM_BATCH" --max-length 32 --warmup-steps 5 \
        --only 'kiln full;kiln full (candle ops);torch full (default);torch full (best);torch full (best, tf32)' \
        --out "$OUTDIR/gpu-train-minilm-$STAMP.json"
}

run_decoder() {
    echo
    echo "== 2/2 decoder LoRA SFT (bench/decoder.py --device $DEVICE --strategy lora)"
    # shellcheck disable=SC2086  # DECODER_SHAPE is a list of options
    timeout -k 10 "$DECODER_TIMEOUT" "$PY" "$REPO/bench/decoder.py" \
        --kiln "$KILN" --device "$DEVICE" --only sft --strategy lora --torch-tf32 --keep-going \
        --timeout "$CHILD_TIMEOUT" --repeats "$REPEATS" --threads "$THREADS" \
        --train-examples "$DECODER_EXAMPLES" --batch-size "$DECODER_BATCH" --max-length 256 --warmup-steps 5 \
        --learning-rate 2e-4 $DECODER_SHAPE \
        --out "$OUTDIR/gpu-decoder-$STAMP.json"
}

summary() {
    "$PY" - "$OUTDIR/gpu-train-minilm-$STAMP.json" "$OUTDIR/gpu-decoder-$STAMP.json" <<'PY'
import json, os, sys
print("\n== summary (issue 9)")
for path, key, unit in ((sys.argv[1], "summary", "train_ex_per_s"), (sys.argv[2], "sft", "train_tokens_per_s")):
    if not os.path.exists(path):
        print(f"{os.path.basename(path)}: not written (see the log above)")
        continue
    d = json.load(open(path))
    s = (d.get(key) or {}).get("summary", {}) if key == "sft" else d.get(key, {})
    print(f"{d['benchmark']}:")
    for name, x in s.items():
        print(f"  {name:<26} {unit} {x[unit]:,.1f}" if x.get(unit) else f"  {name:<26} {unit} -")
    for k, v in d.get("ratios", {}).items():
        if "train" in k:
            print(f"  {k}: {v:.3f}")
    m = d.get("mfu")
    if m:
        peaks = m["peak_tflops_dense"]
        print(f"  MFU ({m['gpu_name']}, {m['card'] or 'peak unknown'}; {m['formula']}):")
        for name, r in m["configs"].items():
            pct = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"
            t = "-" if r["tflops"] is None else f"{r['tflops']:.2f}"
            print(f"    {name:<26} {t} TFLOP/s = {pct(r['mfu_fp32'])} of FP32, {pct(r['mfu_tf32'])} of TF32 peak")
    for e in d.get("errors", []):
        lines = [l.strip() for l in e["error"].splitlines() if l.strip()]
        what = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1] if lines[1].startswith('Traceback') else lines[1]}"
        print(f"  FAILED: {e['config']} [{e['repeat']}]: {what[:400]}")
PY
}

main() {
    local t0=$SECONDS rc=0
    preflight
    if [ -z "${SKIP_CHECK:-}" ]; then
        run_check || {
            rc=$?
            echo "gpu.sh: the checks exited with $rc$([ $rc = 124 ] && echo " (timed out after ${CHECK_TIMEOUT}s)")"
        }
    fi
    if [ -z "${SKIP_MINILM:-}" ]; then
        run_minilm || {
            rc=$?
            echo "gpu.sh: the MiniLM benchmark exited with $rc$([ $rc = 124 ] && echo " (timed out after ${MINILM_TIMEOUT}s)")"
        }
    fi
    if [ -z "${SKIP_DECODER:-}" ]; then
        local rc2=0
        run_decoder || {
            rc2=$?
            echo "gpu.sh: the decoder benchmark exited with $rc2$([ $rc2 = 124 ] && echo " (timed out after ${DECODER_TIMEOUT}s)")"
        }
        [ $rc2 = 0 ] || rc=$rc2
    fi
    summary || true
    echo "gpu.sh: done in $((SECONDS - t0)) s; results in $OUTDIR (exit status $([ $rc = 0 ] && echo 0 || echo 1))"
    [ $rc = 0 ]
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
