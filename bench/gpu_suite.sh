#!/usr/bin/env bash
# The GPU benchmark suite in a fixed time budget, most important cases first (one H100: ~8 min).
#
#   bash bench/gpu_suite.sh [OUT_DIR]        OUT_DIR: default $OUT, else bench/results
#   BUDGET_S=450 bash bench/gpu_suite.sh     seconds for all phases (default 450)
#   TESTS_S=120                               seconds for the kernel tests on the GPU first (0: skip)
#
# Peer wheels carried in .whl/ (liger-kernel, cut-cross-entropy) are installed into /tmp/site first;
# nash_fast is made importable from this checkout (editable install, else a copy with kernels/
# placed at nash_fast/kernels). Each phase is one `bench/run.py` process that appends rows to
# OUT_DIR/*.csv as it goes; no new case starts after the budget (the rest are written as skipped
# rows) and a phase still running at the end is killed (its finished rows stay). Finally the PNG
# charts and OUT_DIR/tables.md (the README tables) are made from the CSVs.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results}}"
BUDGET_S="${BUDGET_S:-450}"
START=$(date +%s)
END=$((START + BUDGET_S))
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_suite.log"
say() { echo "[suite $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"

# 1. Peers: carried wheels (no index on the device machine).
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  say "installed $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
fi

# 2. nash_fast (and nash_fast.kernels, which lives in kernels/) from this checkout.
importable() { (cd /tmp && python3 -c "import nash_fast, nash_fast.kernels.sequence_logprobs") > /dev/null 2>&1; }
if ! importable; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/nash_fast_install.log 2>&1
  if importable; then
    say "nash_fast: editable install"
  else
    say "nash_fast: editable install failed ($(tail -1 /tmp/nash_fast_install.log)); using a copy in /tmp/nfsrc"
    rm -rf /tmp/nfsrc && mkdir -p /tmp/nfsrc && cp -r nash_fast /tmp/nfsrc/ \
      && rm -rf /tmp/nfsrc/nash_fast/kernels && cp -r kernels /tmp/nfsrc/nash_fast/kernels
    export PYTHONPATH=/tmp/nfsrc:${PYTHONPATH:-}
  fi
fi
(cd /tmp && python3 -c "import torch, triton, nash_fast; print('torch', torch.__version__, 'triton', triton.__version__, 'nash_fast', nash_fast.__file__)") 2>&1 | tee -a "$LOG"

# 3. Correctness first: the kernel tests with compiled kernels on CUDA tensors (tests/conftest.py sets
#    the interpreter only where there is no GPU), at most TESTS_S seconds (default 120; 0 skips them).
TESTS_S="${TESTS_S:-120}"
if [ "$TESTS_S" -gt 0 ]; then
  say "tests on the GPU (<= ${TESTS_S}s): tests/test_logprobs.py tests/test_fused_loss.py"
  (cd tests && timeout -k 5 "$TESTS_S" python3 -m pytest -x -p no:cacheprovider -rfE \
      test_logprobs.py test_fused_loss.py) > "$OUT_DIR/gpu_tests.log" 2>&1
  tests_rc=$?
  say "tests ended with status $tests_rc ($(grep -E '[0-9]+ (passed|failed)' "$OUT_DIR/gpu_tests.log" | tail -1)); see gpu_tests.log"
fi

# 4. Phases, most important first. No case starts in the last 30 s of the budget.
phase() {
  local name=$1; shift
  local left=$((END - $(date +%s)))
  say "phase $name ($left s left): $*"
  if [ "$left" -le 20 ]; then
    python3 bench/run.py --device "${DEVICE:-cuda}" --out "$OUT_DIR" --deadline 0 "$@" >> "$LOG" 2>&1
    return
  fi
  timeout -k 10 "$left" python3 bench/run.py --device "${DEVICE:-cuda}" --out "$OUT_DIR" --deadline $((END - 30)) "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || say "phase $name ended with status $rc"
}

PEERS=naive,compile,liger,cce,ours_triton
phase 1-llama-16k    --only logprobs --shapes llama3-8b --n 16384 --methods $PEERS
phase 2-loss-llama   --only loss --shapes llama3-8b --n 16384
phase 3-e2e          --only e2e
phase 4-llama-rest   --only logprobs --shapes llama3-8b --n 16384 --methods cce_exact,ours_torch
phase 5-shapes-16k   --only logprobs --shapes mistral-7b,qwen2.5-7b,gemma2-2b --n 16384 --methods $PEERS
phase 6-n64k         --only logprobs --n 65536 --methods $PEERS
phase 7-n4k          --only logprobs --n 4096 --methods $PEERS
phase 8-shapes-rest  --only logprobs --shapes mistral-7b,qwen2.5-7b,gemma2-2b --n 16384 --methods cce_exact,ours_torch
phase 9-loss-shapes  --only loss --shapes mistral-7b,qwen2.5-7b,gemma2-2b --n 16384

# 5. Charts and README tables from what was measured.
python3 bench/plot.py --results "$OUT_DIR" >> "$LOG" 2>&1 || say "plot failed (see log)"
python3 bench/plot.py --results "$OUT_DIR" --markdown > "$OUT_DIR/tables.md" 2>> "$LOG" || say "tables failed"
say "done; CSVs in $OUT_DIR"
