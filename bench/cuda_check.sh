#!/usr/bin/env bash
# The GPU checks, in one go on a machine with a CUDA device (issue 14): the CUDA tests,
# bench.cuda_bench part by part, then the whole test suite. Logs and results go to $1.
#
#     bash bench/cuda_check.sh OUT_DIR [SUITE_SECONDS] [BENCH_PARTS]
set -u
out=${1:?usage: bench/cuda_check.sh OUT_DIR [SUITE_SECONDS] [BENCH_PARTS]}
suite_seconds=${2:-150}
parts=${3:-quality step engine serve}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  command -v cc gcc || echo "no C compiler: the CPU kernels (lm/native) fall back"
} 2>&1 | tee "$out/bench.log"
timeout 180 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
for part in $parts; do
  echo "== $part" | tee -a "$out/bench.log"
  timeout 200 python3 -m bench.cuda_bench --parts "$part" --out "$out/cuda-$part.json" 2>&1 \
    | tee -a "$out/bench.log"
done
echo "== test suite ($suite_seconds s at most)"
# SIGINT first: pytest then still prints the failures it has seen.
timeout -s INT -k 30 "$suite_seconds" python3 -m pytest -q -p no:cacheprovider -n 12 \
  --continue-on-collection-errors -rfE > "$out/suite.log" 2>&1
grep -E "(FAILED|ERROR) " "$out/suite.log" | cut -c1-250 | tail -60
tail -3 "$out/suite.log"
