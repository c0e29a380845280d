#!/usr/bin/env bash
# `make test`: release build + tests, ASan/UBSan build + tests, short fuzzing.
# Each stage's output goes to the terminal and to build/test-logs; the last
# lines printed are the summary lines of every runner, in stage order.
set -uo pipefail
cd "$(dirname "$0")/.."
JOBS=$(nproc)
PY=/usr/bin/python3
LOGS=build/test-logs
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
mkdir -p "$LOGS"
failed=0
summaries=()

stage() { # name logfile command...
  local name=$1 log=$2; shift 2
  echo "==> $name"
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  if ((rc != 0)); then echo "==> $name FAILED (exit $rc)"; failed=1; fi
  return $rc
}

build() { # dir cmake-args...
  local dir=$1; shift
  cmake -S . -B "$dir" -DARQ_WERROR=ON "$@" >/dev/null && cmake --build "$dir" -j "$JOBS"
}

stage "release build" $LOGS/build-release.log build build/release -DCMAKE_BUILD_TYPE=Release || exit 1
stage "asan build" $LOGS/build-asan.log build build/asan -DCMAKE_BUILD_TYPE=Debug -DARQ_SANITIZE=ON || exit 1
CC=clang stage "fuzz build" $LOGS/build-fuzz.log build build/fuzz -DCMAKE_BUILD_TYPE=Debug -DARQ_FUZZ=ON || exit 1

stage "unit tests (release)" $LOGS/unit-release.log ctest --test-dir build/release --output-on-failure
summaries+=("unit (release):        $(grep -E 'tests passed|tests failed' $LOGS/unit-release.log | tail -1)")

stage "integration tests (release)" $LOGS/integration-release.log \
  env ARQONBUS_BIN="$PWD/build/release/arqonbus" $PY -m pytest -q -p no:cacheprovider tests/integration
summaries+=("integration (release): $(grep -E '(passed|failed|error)' $LOGS/integration-release.log | tail -1)")

stage "unit tests (asan+ubsan)" $LOGS/unit-asan.log ctest --test-dir build/asan --output-on-failure
summaries+=("unit (asan):           $(grep -E 'tests passed|tests failed' $LOGS/unit-asan.log | tail -1)")

stage "integration tests (asan+ubsan)" $LOGS/integration-asan.log \
  env ARQONBUS_BIN="$PWD/build/asan/arqonbus" ARQONBUS_SANITIZED=1 $PY -m pytest -q -p no:cacheprovider tests/integration
summaries+=("integration (asan):    $(grep -E '(passed|failed|error)' $LOGS/integration-asan.log | tail -1)")

stage "fuzzing (${FUZZ_SECONDS}s per target)" $LOGS/fuzz.log scripts/fuzz.sh "$FUZZ_SECONDS" build/fuzz
summaries+=("fuzz:                  $(tail -1 $LOGS/fuzz.log)")

echo
echo "==> summary"
for s in "${summaries[@]}"; do echo "$s"; done
exit $failed
