#!/usr/bin/env bash
# How close `dry_run` estimates are to real runs: for each strategy, ask kiln for the plan
# (`kiln jobs create --dry-run`), then run the same job (`--watch`) and time it from create to
# succeeded. Needs a running kiln (KILN_URL, KILN_API_KEY) with all-MiniLM-L6-v2 under its
# models directory (scripts/fetch-minilm.sh), and the kiln binary (KILN_BIN, default
# target/release/kiln).
set -euo pipefail
cd "$(dirname "$0")/.."
K="${KILN_BIN:-target/release/kiln}"
MODEL=sentence-transformers/all-MiniLM-L6-v2
file=$("$K" files upload tests/data/topics-train.jsonl --wait --json |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
printf '%-10s %12s %10s %7s\n' strategy estimated real ratio
for strategy in full lora head_only; do
  args=(jobs create --model "$MODEL" --training-file "$file" -H n_epochs=2 -H "strategy=$strategy")
  estimate=$("$K" "${args[@]}" --dry-run --json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["estimate"]["estimated_seconds"])')
  start=$(date +%s.%N)
  "$K" "${args[@]}" --watch >/dev/null 2>&1
  end=$(date +%s.%N)
  python3 -c "e, r = $estimate, $end - $start; print(f'{\"$strategy\":<10} {e:>10.1f} s {r:>8.1f} s {e / r:>7.2f}')"
done
