#!/usr/bin/env bash
# The one GPU check: the whole test suite on CUDA, then the benchmark suite and its report.
# Everything lands under $OUT (default: ./gpu_check_out). Sized to finish within ~8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/environment.txt"

status=0
python -m pytest tests -q --junitxml="$OUT/tests.xml" -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

python -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/benchmarks.json" --benchmark-columns=median,min,max 2>&1 | tee "$OUT/benchmarks.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

python -m benchmarks.report "$OUT/benchmarks.json" --out "$OUT" > /dev/null || status=1
echo "report: $OUT/report.md"
exit "$status"
