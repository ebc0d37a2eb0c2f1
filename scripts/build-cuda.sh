#!/usr/bin/env bash
# Build kiln's GPU binary (`cargo build --release --features cuda`) on a machine that has
# neither a GPU nor a CUDA toolkit, from NVIDIA's CUDA 13.0 wheels on PyPI.
#
#   scripts/build-cuda.sh [--strip] [--out PATH] [--bundle-libs]
#   eval "$(scripts/build-cuda.sh --env)"    # then any cargo command: cargo test --features cuda
#
#   --out PATH     copy the binary to PATH as well
#   --strip        strip the copy at PATH (or, without --out, the binary in the target
#                  directory): smaller, but backtraces lose their line numbers
#   --bundle-libs  with --out: copy the CUDA libraries the binary loads (not the driver's
#                  libcuda.so.1) into `$(dirname PATH)/lib`, which the binary's runpath names,
#                  for a GPU machine without them (~700 MB, mostly cuBLASLt)
#   --env          set up as for a build, then print the environment (shell exports) instead
#                  of building, for other cargo commands with the same artifacts
#
# Environment (all optional):
#   CUDA_COMPUTE_CAP      the GPU architecture the kernels are compiled for, without the dot
#                         (default 90: H100/H200; 80 A100, 86 RTX 30xx/A10, 89 L4/RTX 40xx)
#   KILN_CUDA_DIR         where the wheels, the link directory and the stub live
#                         (default ~/.cache/kiln-cuda; about 1.2 GB)
#   KILN_CUDA_TARGET_DIR  cargo's target directory (default $CARGO_TARGET_DIR, else
#                         target/cuda: kept apart from the CPU build, which it would rebuild)
#   KILN_CUDA_RPATH       the runpath written into the binary (default below; empty: none)
#   PYTHON                a Python with pip (default python3)
#
# What it does, and why:
# - Installs pinned CUDA 13.0 wheels (the versions PyTorch 2.11's cu130 build depends on) into
#   a private directory with `pip install --target`. nvcc 13.1+ writes PTX that the R580
#   driver (CUDA 13.0) cannot load, so the compiler is pinned too. Skipped when already there.
# - Makes a toolkit directory: bin/include/nvvm link to the wheels', lib/ holds unversioned
#   links (the wheels ship only libfoo.so.N) and lib/stubs/libcuda.so, a link-time stub of the
#   driver library. candle links cudarc with `dynamic-linking`: the binary calls the driver API
#   (cuInit, cuLaunchKernel, ...) directly, so linking needs a libcuda.so that exports those
#   names. The stub's soname is libcuda.so.1: at run time the real driver's libcuda.so.1 is
#   loaded instead (each stub function returns CUDA_ERROR_STUB_LIBRARY should it ever run).
#   Its symbols are every driver function cudarc declares, read from cudarc's sources.
# - Builds with CUDA_HOME/CUDA_PATH (cudarc's link search and candle-kernels' nvcc includes),
#   PATH (nvcc), LIBRARY_PATH and CUDA_COMPUTE_CAP (no nvidia-smi to ask here) set, and a
#   runpath so the binary finds the CUDA libraries of a PyTorch install on the GPU machine.
# - Checks the result: its dynamic dependencies, that every driver symbol it imports is
#   declared by CUDA 13.0's cuda.h (so the real driver exports it), and that it starts
#   (`kiln --version`, with the stub standing in for the driver).
#
# On the GPU machine the binary needs the NVIDIA driver (libcuda.so.1, R580+ for CUDA 13.0) and
# libcudart.so.13, libcublas.so.13 (with its libcublasLt.so.13) and libcurand.so.10 (the
# checks print the list). The runpath names PyTorch's copies at the default path below
# (/opt/torch/.venv, Python 3.12); elsewhere find them with
#   python3 -c 'import os, nvidia.cu13 as m; print(os.path.join(m.__path__[0], "lib"))'
# (or `find / -name libcublas.so.13 2>/dev/null`) and export LD_LIBRARY_PATH=<that dir>.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${KILN_CUDA_DIR:-$HOME/.cache/kiln-cuda}
PYTHON=${PYTHON:-python3}
CAP=${CUDA_COMPUTE_CAP:-90}
TARGET_DIR=${KILN_CUDA_TARGET_DIR:-${CARGO_TARGET_DIR:-$REPO/target/cuda}}
TORCH_LIB=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib
# '$ORIGIN' is literal: the dynamic loader replaces it by the binary's directory.
# shellcheck disable=SC2016
RPATH=${KILN_CUDA_RPATH-'$ORIGIN/lib'":$TORCH_LIB"}

# The CUDA 13.0 wheels PyTorch 2.11 (cu130) is built against.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.1.0.3
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
)

STRIP=0
OUT=
BUNDLE=0
ENV_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --strip) STRIP=1 ;;
    --out) OUT=${2:?--out needs a path}; shift ;;
    --out=*) OUT=${1#--out=} ;;
    --bundle-libs) BUNDLE=1 ;;
    --env) ENV_ONLY=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-cuda.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$BUNDLE" = 1 ] && [ -z "$OUT" ]; then
  echo "build-cuda.sh: --bundle-libs needs --out PATH" >&2
  exit 2
fi
case "$CAP" in
  [1-9][0-9]|[1-9][0-9][0-9]) ;;
  *) echo "build-cuda.sh: CUDA_COMPUTE_CAP=$CAP: give it without the dot, e.g. 90 or 86" >&2; exit 2 ;;
esac

if [ "$ENV_ONLY" = 1 ]; then
  # The exports go to the original stdout (fd 3); everything else to stderr.
  exec 3>&1 1>&2
fi
step() { printf '\n== %s ==\n' "$*"; }
die() { echo "build-cuda.sh: $*" >&2; exit 1; }
for tool in cargo gcc readelf nm; do
  command -v "$tool" >/dev/null || die "$tool is needed (apt-get install build-essential binutils; rustup)"
done
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON -m pip is needed (or set PYTHON)"
START=$(date +%s)

step "CUDA 13.0 wheels in $DIR/py"
PY=$DIR/py
CU=$PY/nvidia/cu13
STAMP=$PY/.kiln-wheels
if [ -x "$CU/bin/nvcc" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "${WHEELS[*]}" ]; then
  echo "already installed: ${WHEELS[*]}"
else
  rm -rf "$PY"
  mkdir -p "$DIR"
  # --no-deps: the pins are the whole set (the nvcc wheel's own requirements would pull in
  # the newest crt/nvvm, whose PTX the R580 driver cannot load).
  "$PYTHON" -m pip install --disable-pip-version-check --no-deps --target "$PY" "${WHEELS[@]}"
  echo "${WHEELS[*]}" > "$STAMP"
fi
"$CU/bin/nvcc" --version | tail -n 2

step "toolkit directory $DIR/toolkit"
TK=$DIR/toolkit
mkdir -p "$TK/lib/stubs"
for d in bin include nvvm; do
  ln -sfn "$CU/$d" "$TK/$d"
done
for f in "$CU"/lib/lib*; do
  name=$(basename "$f")
  ln -sfn "$f" "$TK/lib/$name"
  case "$name" in
    # libfoo.so.13 / libfoo.so.13.0 -> libfoo.so, the name the linker looks for
    *.so.*) ln -sfn "$f" "$TK/lib/${name%%.so.*}.so" ;;
  esac
done
for lib in cudart cublas cublasLt curand nvrtc; do
  [ -e "$TK/lib/lib$lib.so" ] || die "lib$lib.so missing from the wheels in $CU/lib"
done

step "link-time stub of the driver library (libcuda.so)"
cd "$REPO"
cargo fetch --locked >/dev/null
# The driver API functions of every cudarc the CUDA build resolves.
mapfile -t CUDARC_SRCS < <(cargo metadata --format-version 1 --locked --features cuda \
  | "$PYTHON" -c '
import json, os, sys
meta = json.load(sys.stdin)
used = {node["id"] for node in meta["resolve"]["nodes"]}
for pkg in meta["packages"]:
    if pkg["name"] == "cudarc" and pkg["id"] in used:
        src = os.path.join(os.path.dirname(pkg["manifest_path"]), "src/driver/sys/mod.rs")
        if os.path.exists(src):
            print(src)
')
[ "${#CUDARC_SRCS[@]}" -gt 0 ] || die "no cudarc driver bindings found (is the cuda feature in Cargo.toml?)"
printf 'from %s\n' "${CUDARC_SRCS[@]}"
STUB_C=$TK/lib/stubs/libcuda-stub.c
{
  echo "/* Generated by scripts/build-cuda.sh: a link-time stand-in for the CUDA driver library."
  echo "   Never loaded on a GPU machine (the driver's libcuda.so.1 is); each function returns"
  echo "   CUDA_ERROR_STUB_LIBRARY (34). */"
  grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "${CUDARC_SRCS[@]}" \
    | sed -E 's/pub unsafe fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
    | while read -r sym; do echo "int $sym(void) { return 34; }"; done
} > "$STUB_C.new"
if ! cmp -s "$STUB_C.new" "$STUB_C" || [ ! -e "$TK/lib/stubs/libcuda.so" ]; then
  mv "$STUB_C.new" "$STUB_C"
  gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$TK/lib/stubs/libcuda.so" "$STUB_C"
else
  rm "$STUB_C.new"
fi
echo "$(grep -c '^int ' "$STUB_C") driver functions in $TK/lib/stubs/libcuda.so"

export CUDA_HOME=$TK CUDA_PATH=$TK CUDA_ROOT=$TK
export NVCC=$TK/bin/nvcc
export PATH=$TK/bin:$PATH
export LIBRARY_PATH=$TK/lib:$TK/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
export CUDA_COMPUTE_CAP=$CAP
export CARGO_TARGET_DIR=$TARGET_DIR
# Let the linker find the libraries' own dependencies (libcublas.so.13 -> libcublasLt.so.13).
FLAGS="-C link-arg=-Wl,-rpath-link,$TK/lib"
if [ -n "$RPATH" ]; then
  FLAGS="$FLAGS -C link-arg=-Wl,-rpath,$RPATH"
fi
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }$FLAGS"
# The wheels' libraries, for binaries cargo runs here (build scripts, tests). No GPU here means
# no libcuda.so.1 either: a test binary starts only with the stub standing in for it, e.g.
# LD_LIBRARY_PATH=$DIR/smoke-lib:$LD_LIBRARY_PATH (never on a GPU machine: it hides the driver).
export LD_LIBRARY_PATH=$TK/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
SMOKE=$DIR/smoke-lib
mkdir -p "$SMOKE"
ln -sfn "$TK/lib/stubs/libcuda.so" "$SMOKE/libcuda.so.1"
if [ "$ENV_ONLY" = 1 ]; then
  for var in CUDA_HOME CUDA_PATH CUDA_ROOT NVCC PATH LIBRARY_PATH LD_LIBRARY_PATH \
    CUDA_COMPUTE_CAP CARGO_TARGET_DIR RUSTFLAGS; do
    printf 'export %s=%q\n' "$var" "${!var}" >&3
  done
  exit 0
fi

step "cargo build --release --features cuda (sm_$CAP, target $TARGET_DIR)"
BUILD_START=$(date +%s)
cargo build --release --locked --features cuda --bin kiln
BUILD_SECONDS=$(( $(date +%s) - BUILD_START ))
BIN=$TARGET_DIR/release/kiln

step "checks"
echo "dynamic section:"
readelf -d "$BIN" | grep -E 'NEEDED|RUNPATH|RPATH' | sed 's/^ */  /'
# The libraries of the toolkit the binary loads, with theirs (libcublas -> libcublasLt).
needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
CUDA_LIBS=()
for lib in $(needed "$BIN"); do
  if [ -e "$TK/lib/$lib" ]; then
    CUDA_LIBS+=("$lib")
    for dep in $(needed "$TK/lib/$lib"); do
      [ -e "$TK/lib/$dep" ] && CUDA_LIBS+=("$dep")
    done
  fi
done
mapfile -t CUDA_LIBS < <(printf '%s\n' "${CUDA_LIBS[@]}" | sort -u)
echo "CUDA libraries it loads: ${CUDA_LIBS[*]} (and the driver's libcuda.so.1)"
# Every driver function the binary imports must be in CUDA 13.0's cuda.h (after its
# `#define cuFoo cuFoo_v2` renames), which the R580 driver implements.
DECLARED=$(mktemp)
IMPORTED=$(mktemp)
trap 'rm -f "$DECLARED" "$IMPORTED"' EXIT
echo '#include <cuda.h>' | gcc -E -P -I "$TK/include" -x c - \
  | grep -oE '\bcu[A-Za-z0-9_]+[[:space:]]*\(' | tr -d '( \t' | sort -u > "$DECLARED"
nm -D --undefined-only "$BIN" | awk '{print $2}' | grep -E '^cu[A-Z]' | sed 's/@.*//' \
  | sort -u > "$IMPORTED"
UNKNOWN=$(comm -23 "$IMPORTED" "$DECLARED")
[ -z "$UNKNOWN" ] || die "the binary imports driver functions CUDA 13.0's cuda.h lacks: $UNKNOWN"
echo "$(wc -l < "$IMPORTED") driver functions imported, all declared by CUDA 13.0's cuda.h"
# Start it, with the stub standing in for the driver (no GPU here).
LD_LIBRARY_PATH=$SMOKE:$LD_LIBRARY_PATH "$BIN" --version

if [ -n "$OUT" ]; then
  mkdir -p "$(dirname "$OUT")"
  cp "$BIN" "$OUT"
  [ "$STRIP" = 0 ] || strip "$OUT"
  if [ "$BUNDLE" = 1 ]; then
    mkdir -p "$(dirname "$OUT")/lib"
    for lib in "${CUDA_LIBS[@]}"; do
      cp -L "$TK/lib/$lib" "$(dirname "$OUT")/lib/"
    done
  fi
elif [ "$STRIP" = 1 ]; then
  strip "$BIN"
fi

step "done"
echo "binary:     $BIN ($(du -h "$BIN" | cut -f1), sm_$CAP)"
[ -z "$OUT" ] || echo "copied to:  $OUT ($(du -h "$OUT" | cut -f1))"
[ "$BUNDLE" = 0 ] || echo "libraries:  $(dirname "$OUT")/lib ($(du -sh "$(dirname "$OUT")/lib" | cut -f1))"
echo "build time: ${BUILD_SECONDS}s (cargo), $(( $(date +%s) - START ))s in all"
echo "runpath:    ${RPATH:-none}"
cat <<EOF

On the GPU machine it needs the NVIDIA driver (libcuda.so.1, R580 or newer) and
${CUDA_LIBS[*]}.
PyTorch's cu13 wheels carry them; if they are not on the runpath above, find them with
  python3 -c 'import os, nvidia.cu13 as m; print(os.path.join(m.__path__[0], "lib"))'
(or: find / -name libcublas.so.13 2>/dev/null) and run kiln with LD_LIBRARY_PATH=<that dir>.
Check with: ldd $(basename "${OUT:-$BIN}") | grep 'not found'   (should print nothing)
Choose the devices with KILN_DEVICES=cuda:0 (or cuda, or cpu).
EOF
