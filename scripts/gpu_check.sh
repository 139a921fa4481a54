#!/usr/bin/env bash
# The one GPU check, in tiers, inside a time budget (GPU_CHECK_BUDGET_S seconds, default 480, cold
# Triton cache included):
#   1. CUDA correctness: kernels (the MoE ones with bf16 dots and the CUDA-graph decode capture
#      included), fused model, Qwen3-MoE, generation, parity, CLI (what only a GPU can prove;
#      the compile gate and the CPU-only tests are proven on the CPU and skipped here);
#   1b. tuning: `qwen3_kernels.tune` ranks the attention candidates (forward tiles, backward designs,
#      SDPA's backends against the Triton kernels) at Qwen3-0.6B's shapes into a fresh cache; its
#      table goes into summary.txt, and every candidate's time at every tuned shape, in this tier and
#      the benchmarks after it, into tuning.jsonl ($QWEN3_KERNELS_TUNING_LOG);
#   2. the benchmarks the goals are judged on (benchmarks/conftest.py GOAL_CASES) and the report;
#   3. every other benchmark, while time remains.
# Each tier writes into $OUT (default ./gpu_check_out) as it finishes, at most 8 files in all, so a
# run cut off at the deadline still reports what it measured: summary.txt (the environment first),
# 1-correctness.log, tuning.jsonl, 2-goals.json, 2-goals.log, 3-rest.json, 3-rest.log, report.md.
# On a machine without a CUDA device it says so, skips every tier and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
PYTHON="${PYTHON:-python}"
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# Runs "$@" with what is left of the budget minus a reserve for the later steps; SIGINT first, so
# pytest still writes its summary and JSON, then SIGKILL 15 s later.
within_budget() {
  local reserve=$1; shift
  local limit=$(( $(left) - reserve ))
  if [ "$limit" -lt 20 ]; then
    return 124
  fi
  timeout --signal=INT --kill-after=15 "$limit" "$@"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "budget: ${BUDGET} s"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee -a "$SUMMARY"

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "no CUDA device here: skipped tier 1 (CUDA correctness), tier 1b (tuning), tier 2 (goal benchmarks) and"
  say "tier 3 (other benchmarks); the CPU proves the rest with 'pytest tests' (interpreter cases and the compile gate)"
  exit 0
fi

status=0
# A fresh tuning cache, so every candidate is timed here (and logged), not read back from an earlier run.
export QWEN3_KERNELS_CACHE_DIR="${GPU_CHECK_CACHE_DIR:-$(mktemp -d)}"
export QWEN3_KERNELS_TUNING_LOG="$OUT/tuning.jsonl"
: > "$QWEN3_KERNELS_TUNING_LOG"
# Tier 1. The compile gate and the CPU-only logic (config, tokenizer, report formulas) prove nothing new here.
within_budget 250 "$PYTHON" -m pytest tests/ops tests/test_fused_model.py tests/test_generation.py \
  tests/test_parity.py tests/test_cli.py tests/test_bad_input.py tests/test_loss.py tests/test_packed_batches.py \
  tests/test_hf.py tests/test_moe_model.py tests/test_hf_moe.py --ignore=tests/ops/test_aot_compile.py \
  -q -p no:cacheprovider > "$OUT/1-correctness.log" 2>&1
rc=$?
say "tier 1 (CUDA correctness): exit $rc after $(( $(date +%s) - START )) s; $(tail -n 1 "$OUT/1-correctness.log")"
[ "$rc" -eq 0 ] || status=1

# Tier 1b: which attention design wins on this card, shape by shape (the table into summary.txt; every
# candidate's time into tuning.jsonl). The benchmarks after it read these choices from the cache.
say "tier 1b (tuning, Qwen3-0.6B shapes):"
within_budget 120 "$PYTHON" -m qwen3_kernels.tune --preset 0.6B --tokens 16384 --max-len 16384 >> "$SUMMARY" 2>&1
rc=$?
tunings=$(wc -l < "$QWEN3_KERNELS_TUNING_LOG")
say "tier 1b (tuning): exit $rc after $(( $(date +%s) - START )) s; $tunings tunings logged in tuning.jsonl"
[ "$rc" -eq 0 ] || status=1

# Tier 2: the goal shapes, with the report written as soon as they are measured.
within_budget 30 "$PYTHON" -m pytest benchmarks --benchmark-only --tier goals -q -p no:cacheprovider \
  --benchmark-json="$OUT/2-goals.json" --benchmark-columns=median,min,max > "$OUT/2-goals.log" 2>&1
rc=$?
say "tier 2 (goal benchmarks): exit $rc after $(( $(date +%s) - START )) s; $(tail -n 1 "$OUT/2-goals.log")"
[ "$rc" -eq 0 ] || status=1
report() {
  local inputs=()
  for f in "$OUT/2-goals.json" "$OUT/3-rest.json"; do [ -s "$f" ] && inputs+=("$f"); done
  [ "${#inputs[@]}" -gt 0 ] && "$PYTHON" -m benchmarks.report "${inputs[@]}" --out "$OUT" --no-plots > /dev/null
}
report || say "report: no benchmark results to report"

# Tier 3: everything else, while time remains.
within_budget 10 "$PYTHON" -m pytest benchmarks --benchmark-only --tier rest -q -p no:cacheprovider \
  --benchmark-json="$OUT/3-rest.json" --benchmark-columns=median,min,max > "$OUT/3-rest.log" 2>&1
rc=$?
if [ "$rc" -eq 124 ] && [ ! -s "$OUT/3-rest.log" ]; then
  say "tier 3 (other benchmarks): skipped, the budget is spent"
else
  say "tier 3 (other benchmarks): exit $rc after $(( $(date +%s) - START )) s; $(tail -n 1 "$OUT/3-rest.log")"
  report
fi
say "total: $(( $(date +%s) - START )) s of ${BUDGET} s; report: $OUT/report.md"
exit "$status"
