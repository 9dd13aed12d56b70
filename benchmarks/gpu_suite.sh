#!/usr/bin/env bash
# Every GPU-size benchmark of the project, most important first, within about 8 minutes
# on one H100. Figures go to the file given (default benchmarks/gpu-results.txt);
# copy them into docs/benchmarks.md with the card's name.
#   bash benchmarks/gpu_suite.sh [RESULTS_FILE]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/gpu-results.txt}
python=${PYTHON:-python3}
{
  echo "# bidsenc GPU benchmarks, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$out"
status=0
# most important first; each bounded so that the three fit in about 8 minutes
for entry in lm_extraction:200 ridge_vs_himalaya:180 audio_extraction:100; do
  bench=${entry%%:*}; limit=${entry##*:}
  echo "## $bench --size gpu" | tee -a "$out"
  PYTHONUNBUFFERED=1 timeout "$limit" "$python" "benchmarks/$bench.py" --size gpu 2>&1 | tee -a "$out"
  code=${PIPESTATUS[0]}
  [ "$code" -eq 0 ] || { echo "## $bench exited $code" | tee -a "$out"; status=1; }
done
echo "figures written to $out"
exit $status
