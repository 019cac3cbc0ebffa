#!/usr/bin/env bash
# One GPU session's measurements in one go: the bench table at the 7B and 0.5B LLaVA-OneVision
# shapes, the CUDA correctness check, and prefill profiles. Results land in $OUT (default
# runs/gpu): bench-7b/bench.json, bench-0.5b/bench.json, log.txt.
#   bash benchmarks/gpu.sh            # on a machine with one CUDA GPU, from the repository root
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
shape="--visual-tokens 7290 --text-tokens 64 --new-tokens 32 --repeats 5 --warmup 2"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  for size in 7b 0.5b; do
    echo "== bench $size"
    timeout 240 $PY -m visor.cli bench --size "$size" $shape --methods hf,full,visor:2,visor:7 --out "$OUT/bench-$size" ||
      timeout 150 $PY -m visor.cli bench --size "$size" $shape --methods hf,full,visor:2,visor:7 --decode graph \
        --out "$OUT/bench-$size"
  done
  echo "== check_cuda"
  timeout 150 $PY benchmarks/check_cuda.py
  for size in 0.5b 7b; do
    echo "== profile $size visor:2"
    timeout 90 $PY benchmarks/profile_prefill.py "$size" visor:2
  done
} 2>&1 | tee "$OUT/log.txt"
