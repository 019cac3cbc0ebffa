#!/usr/bin/env bash
# One GPU session's measurements in one go (~7 min on an H200): the bench table at the 0.5B and 7B
# LLaVA-OneVision shapes, the CUDA correctness check, and the 0.5B prefill's modes side by side.
# Results land in $OUT (default runs/gpu): bench-0.5b/bench.json, bench-7b/bench.json, log.txt.
#   bash benchmarks/gpu.sh            # on a machine with one CUDA GPU, from the repository root
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
shape="--visual-tokens 7290 --text-tokens 64 --new-tokens 32 --repeats ${REPEATS:-5} --warmup 1"
bench() {  # size methods seconds; if the compiled prefill fails, the plain CUDA-graph one
  echo "== bench $1 $2 ($(date +%T))"
  timeout "$3" $PY -m visor.cli bench --size "$1" $shape --methods "$2" --out "$OUT/bench-$1" ||
    timeout "$3" $PY -m visor.cli bench --size "$1" $shape --methods "$2" --prefill graph --out "$OUT/bench-$1"
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  bench 0.5b hf,full,visor:2 ${T05B:-150}
  bench 7b hf,full,visor:2 ${T7B:-180}
  echo "== check_cuda ($(date +%T))"  # bf16 then float32, about a minute each on an H200
  timeout "${TCHECK:-200}" $PY benchmarks/check_cuda.py
  for mode in graph compile-graph; do
    echo "== profile 0.5b visor:2 prefill $mode ($(date +%T))"
    timeout "${TPROFILE:-40}" $PY benchmarks/profile_prefill.py 0.5b visor:2 7290 cuda $mode
  done
  echo "== done ($(date +%T))"
} 2>&1 | tee "$OUT/log.txt"
