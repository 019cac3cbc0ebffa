#!/usr/bin/env bash
# Every command that loads a model, run on the GPU with --device/--dtype (a tiny random model and a
# small generated data set; about a minute), eval on the default (compile-graph) and the eager path,
# bf16 training with DataLoader workers, benchmarks/check_cuda.py, then the output-safety tests.
#   bash benchmarks/cuda_commands.sh              # from the repository root, on a machine with a GPU
#   DEVICE=cpu bash benchmarks/cuda_commands.sh   # the same on the CPU (a dry run)
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
DEV=${DEVICE:-cuda}
OUT=${OUT:-runs/cuda-commands-$(date +%s)}  # a new directory each time
PY=${PYTHON:-python3}
mkdir -p "$OUT"
V="$PY -m visor.cli"
failed=0
run() {  # name command...: one line per command, its log under $OUT
  local name=$1
  shift
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "ok   $name"
  else
    echo "FAIL $name (exit $?)"
    tail -n 8 "$OUT/$name.log"
    failed=$((failed + 1))
  fi
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  on=(--device "$DEV" --dtype bfloat16)
  image="$OUT/data/images/test/quadrant_00000.png"
  run tiny-model $V tiny-model --out "$OUT/base"
  run data-make $V data make --out "$OUT/data" --train 8 --val 4 --test 4 --image-size 64 --tasks quadrant,dominant_colour
  run convert $V convert --model "$OUT/base" --out "$OUT/visor"
  run generate $V generate --model "$OUT/visor" --image "$image" --prompt "Which quadrant?" "${on[@]}" --json
  run generate-auto $V generate --model "$OUT/visor" --image "$image" --prompt "Which quadrant?" --json
  run eval $V eval --model "$OUT/visor" --data "$OUT/data/test.jsonl" "${on[@]}" --out "$OUT/eval"
  run train-stage1 $V train --model "$OUT/visor" --data "$OUT/data/train.jsonl" --stage 1 --steps 2 --batch-size 4 \
    --device "$DEV" --out "$OUT/s1"
  run train-stage2 $V train --model "$OUT/s1/final" --data "$OUT/data/train.jsonl" --stage 2 --steps 4 --batch-size 4 \
    --save-every 2 --device "$DEV" --out "$OUT/s2"
  run train-resume-done $V train --model "$OUT/s1/final" --data "$OUT/data/train.jsonl" --stage 2 --steps 4 \
    --batch-size 4 --save-every 2 --device "$DEV" --out "$OUT/s2" --resume
  run train-bf16-workers $V train --model "$OUT/s1/final" --data "$OUT/data/train.jsonl" --stage 2 --steps 4 \
    --batch-size 4 --dtype bfloat16 --workers 2 --device "$DEV" --out "$OUT/s2-bf16"
  run eval-eager $V eval --model "$OUT/visor" --data "$OUT/data/test.jsonl" "${on[@]}" --prefill eager --decode dynamic \
    --out "$OUT/eval-eager"
  run train-policy $V train-policy --model "$OUT/s2/final" --data "$OUT/data/val.jsonl" --epochs 5 "${on[@]}" \
    --out "$OUT/policy"
  run compare $V compare --model "$OUT/policy/final" --data "$OUT/data/test.jsonl" --limit 2 "${on[@]}" \
    --out "$OUT/compare"
  run export $V export --model "$OUT/policy/final" --merged "$OUT/merged"
  run generate-merged $V generate --model "$OUT/merged" --image "$image" --prompt "Which quadrant?" "${on[@]}" --json
  $PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name, path in [("eval", "eval/result.json"), ("eval-eager", "eval-eager/result.json"), ("train-policy", "policy/policy_report.json")]:
    if (out / path).is_file():
        r = json.loads((out / path).read_text())
        print(f"{name}: device {r['device']}, dtype {r['dtype']}, modes {r.get('modes')}, prefill {r.get('prefill_seconds', 0):.3f} s")
if (out / "compare/results.json").is_file():
    rows = json.loads((out / "compare/results.json").read_text())["results"]
    print("compare:", sorted({(r["device"], r["dtype"]) for r in rows}))
for name in ["generate", "generate-auto", "generate-merged"]:
    line = (out / f"{name}.log").read_text().strip().splitlines()[-1:] if (out / f"{name}.log").is_file() else []
    print(name, line[0][:160] if line else "")
sizes = {d: sum(f.stat().st_size for f in (out / d).iterdir() if f.is_file()) for d in ["visor", "s1/final", "s2/final", "merged"] if (out / d).is_dir()}
print("checkpoint bytes:", sizes)
EOF
  if [ "$DEV" = cuda ]; then run check-cuda $PY benchmarks/check_cuda.py; else run check-cuda $PY benchmarks/check_cuda.py cpu; fi
  tail -n 4 "$OUT/check-cuda.log"
  echo "== output-safety tests ($(date +%T))"
  timeout "${TTESTS:-300}" $PY -m pytest -q -p no:cacheprovider tests/test_outputs.py tests/test_safety.py \
    2>&1 | tail -n 15
  echo "== $failed command(s) failed ($(date +%T))"
} 2>&1 | tee "$OUT/log.txt"
