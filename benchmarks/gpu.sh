#!/usr/bin/env bash
# One GPU session's measurements in one go (about 12 min on an H200): the serving table (batches 1, 8,
# 32: tokens/s, requests/s, KV cache per request, requests in 40 GiB, decode GB/s against the measured
# copy bandwidth) at the 0.5B and 7B LLaVA-OneVision shapes for transformers (eager and its static-cache
# + torch.compile path), our full forward and VISOR budgets 2 and 7; the CUDA correctness check in
# bf16 and float32; the 0.5B prefill's modes side by side.
# Results land in $OUT (default runs/gpu): bench-<size>-b<batch>/bench.json, log.txt.
#   bash benchmarks/gpu.sh                                   # on a machine with one CUDA GPU, from the repository root
#   BATCHES="1 8" SIZES="0.5b" REPEATS=2 bash benchmarks/gpu.sh    # a shorter run
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
METHODS=${METHODS:-hf,hf-compile,full,visor:2,visor:7}
shape="--visual-tokens 7290 --text-tokens 64 --new-tokens ${NEW_TOKENS:-128} --repeats ${REPEATS:-3} --warmup 1"
bench() {  # size batch seconds; if the compiled prefill fails, the plain CUDA-graph one
  echo "== bench $1 batch $2 ($(date +%T))"
  local out="$OUT/bench-$1-b$2"
  timeout "$3" $PY -m visor.cli bench --size "$1" --batch "$2" $shape --methods "$METHODS" --out "$out" ||
    timeout "$3" $PY -m visor.cli bench --size "$1" --batch "$2" $shape --methods "$METHODS" --prefill graph \
      --out "$out" --overwrite
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  for size in ${SIZES:-0.5b 7b}; do
    for batch in ${BATCHES:-1 8 32}; do
      bench "$size" "$batch" "${TBENCH:-150}"
    done
  done
  echo "== check_cuda ($(date +%T))"  # bf16 then float32, about a minute each on an H200
  timeout "${TCHECK:-200}" $PY benchmarks/check_cuda.py
  echo "== check_cuda families ($(date +%T))"  # Qwen2.5-VL, Qwen3-VL, InternVL through the API path
  timeout "${TFAMILIES:-150}" $PY benchmarks/check_cuda.py cuda families
  for mode in graph compile-graph; do
    echo "== profile 0.5b visor:2 prefill $mode ($(date +%T))"
    timeout "${TPROFILE:-40}" $PY benchmarks/profile_prefill.py 0.5b visor:2 7290 cuda $mode
  done
  echo "== done ($(date +%T))"
} 2>&1 | tee "$OUT/log.txt"
