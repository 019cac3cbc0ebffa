#!/usr/bin/env bash
# One GPU session's measurements in one go (~6 min on an H200): the CUDA correctness check and the
# bench table at the 7B and 0.5B LLaVA-OneVision shapes. Results land in $OUT (default runs/gpu):
# bench-7b/bench.json, bench-0.5b/bench.json, log.txt.
#   bash benchmarks/gpu.sh            # on a machine with one CUDA GPU, from the repository root
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
shape="--visual-tokens 7290 --text-tokens 64 --new-tokens 32 --repeats ${REPEATS:-5} --warmup 1"
bench() {  # size methods seconds
  echo "== bench $1 $2 ($(date +%T))"
  timeout "$3" $PY -m visor.cli bench --size "$1" $shape --methods "$2" --out "$OUT/bench-$1" ||
    timeout "$3" $PY -m visor.cli bench --size "$1" $shape --methods "$2" --prefill eager --out "$OUT/bench-$1"
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  echo "== check_cuda ($(date +%T))"  # float32 and bf16 passes take about a minute each on an H200
  timeout "${TCHECK:-150}" $PY benchmarks/check_cuda.py
  bench 7b hf,full,visor:2 ${T7B:-125}
  bench 0.5b hf,full,visor:2 ${T05B:-80}
  echo "== done ($(date +%T))"
} 2>&1 | tee "$OUT/log.txt"
