"""How much memory a fine-tune needs: full fine-tuning vs LoRA vs QLoRA, on a GPU or on the CPU.

Pure arithmetic over a Llama-style decoder shape, so it runs anywhere (no torch is imported) and
answers "does a 7B LoRA at rank 16 fit my 16 GB card?" before anything is downloaded.

    shapes   ModelShape (from a size name, an HF config or config.json), SIZES, lora_params
    setup    TrainSetup (what is trained and how) and the byte constants (NF4, optimizer states)
    cuda     device="cuda": lorafit's trainer on a GPU, term by term from what its code keeps alive
             (bf16 compute, NF4 base, fp32 adapters + AdamW, checkpointing, chunked loss, fused LoRA,
             cuBLAS workspace); `peak_allocated` is what torch.cuda.max_memory_allocated() should read
    cpu      device="cpu": peak RSS of an fp32 CPU process, with one fitted activation factor
    memory   estimate(setup) -> MemoryEstimate, whose terms sum to its total
    table    format_table: sizes x ranks, as `lorafit estimate` prints it

Units: bytes everywhere, except names ending in `_gb`, which are GiB (2**30 bytes).
"""

from lorafit.train.estimate.cpu import activation_bytes, logits_bytes
from lorafit.train.estimate.cuda import CUBLAS_WORKSPACE_BYTES, CudaPeak, cuda_peak
from lorafit.train.estimate.memory import TERMS, MemoryEstimate, estimate, peak_allocated
from lorafit.train.estimate.setup import (
    CPU_ACTIVATION_FACTOR,
    CPU_BASELINE_GB,
    CUDA_OVERHEAD_GB,
    DEFAULT_DTYPE,
    DEVICES,
    DTYPE_BYTES,
    GIB,
    METHODS,
    NF4_BYTES,
    NF4_DOUBLE_QUANT_BYTES,
    OPTIMIZER_BYTES,
    TrainSetup,
)
from lorafit.train.estimate.shapes import (
    ALL_LINEAR,
    ATTENTION,
    MLP,
    SIZES,
    ModelShape,
    lora_params,
    model_shape,
)
from lorafit.train.estimate.table import TABLE_RANKS, TABLE_SIZES, format_table

__all__ = [
    "ALL_LINEAR",
    "ATTENTION",
    "CPU_ACTIVATION_FACTOR",
    "CPU_BASELINE_GB",
    "CUBLAS_WORKSPACE_BYTES",
    "CUDA_OVERHEAD_GB",
    "DEFAULT_DTYPE",
    "DEVICES",
    "DTYPE_BYTES",
    "GIB",
    "METHODS",
    "MLP",
    "NF4_BYTES",
    "NF4_DOUBLE_QUANT_BYTES",
    "OPTIMIZER_BYTES",
    "SIZES",
    "TABLE_RANKS",
    "TABLE_SIZES",
    "TERMS",
    "CudaPeak",
    "MemoryEstimate",
    "ModelShape",
    "TrainSetup",
    "activation_bytes",
    "cuda_peak",
    "estimate",
    "format_table",
    "logits_bytes",
    "lora_params",
    "model_shape",
    "peak_allocated",
]
