#!/usr/bin/env bash
# Runs every libFuzzer target in build/fuzz for the given number of seconds,
# starting from the seed corpus in tests/fuzz/corpus/<target> and keeping what
# it finds in build/fuzz/corpus/<target>. Exits non-zero on the first crash.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
dir=${2:-build/fuzz}
ran=0
for bin in "$dir"/fuzz_*; do
  [[ -x $bin ]] || continue
  name=$(basename "$bin")
  work="$dir/corpus/$name"
  mkdir -p "$work" "$dir/artifacts"
  seeds=()
  [[ -d tests/fuzz/corpus/$name ]] && seeds=("tests/fuzz/corpus/$name")
  echo "fuzz: $name for ${secs}s"
  "$bin" -max_total_time="$secs" -print_final_stats=0 -artifact_prefix="$dir/artifacts/$name-" \
    "$work" "${seeds[@]+"${seeds[@]}"}" 2>&1 | grep -E '^(#[0-9]+ +DONE|==[0-9]+==|SUMMARY|Done)' || true
  rc=${PIPESTATUS[0]}
  if ((rc != 0)); then echo "fuzz: $name FAILED (exit $rc)"; exit "$rc"; fi
  ran=$((ran + 1))
done
((ran > 0)) || { echo "fuzz: no targets in $dir"; exit 1; }
echo "fuzz: $ran passed, 0 failed"
