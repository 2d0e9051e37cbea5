#!/usr/bin/env bash
# The ablation of docs/ablation.md: ranks (+ full fine-tuning), target modules at r = 8, LoRA vs QLoRA at
# r = 16, all on the date task with the same data, seed and step budget (bench/ablation/date.yaml).
# The three share runs/ablation/points, so a point two of them need runs once; started again after an
# interruption, every finished point is kept and the rest run. Usage: bench/ablation/run.sh [PYTHON]
# (SKIP_MAIN=1: only the demo regime; DEMO_REGIME=0: without it). On a loaded CPU set OMP_NUM_THREADS=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-.venv/bin/python}
OUT=runs/ablation
$PY -c "from lorafit.train.demo_task import make_splits, write_jsonl
train, val = make_splits(600, 40, seed=0)
write_jsonl('$OUT/data/train.jsonl', train); write_jsonl('$OUT/data/val.jsonl', val)"
[ "${SKIP_MAIN:-0}" = 1 ] || {
COMMON=(bench/ablation/date.yaml --out $OUT --max-eval 20 --set full:learning_rate=1e-4)
$PY -m lorafit ablate "${COMMON[@]}" --tag ranks --grid lora.r=1,4,8,16,64 --grid lora.target_modules=all \
    --methods lora,full
$PY -m lorafit ablate "${COMMON[@]}" --tag targets --grid lora.r=8 --grid 'lora.target_modules=q|qk|qkv|qkvo|all'
$PY -m lorafit ablate "${COMMON[@]}" --tag quant --grid lora.r=16 --grid lora.target_modules=all --methods lora,qlora
}

# The demo's regime (lorafit demo: 80 steps of 8, all 40 held-out examples): its QLoRA r=16 at today's
# lr 1e-3 and at 2e-3, and the same on the fp32 base (LoRA): the evidence for the demo's defaults.
if [ "${DEMO_REGIME:-1}" = 1 ]; then
  $PY -m lorafit ablate bench/ablation/date.yaml --out $OUT-demo --tag demo --set max_steps=80 --set save_steps=null \
      --grid lora.r=16 --grid learning_rate=1e-3,2e-3 --methods qlora,lora
fi
