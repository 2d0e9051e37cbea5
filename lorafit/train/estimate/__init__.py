"""How much memory a fine-tune needs: full fine-tuning vs LoRA vs QLoRA (NF4 or ternary base), GPU or CPU.

Pure arithmetic over a Llama-style decoder shape, so it runs anywhere (no torch is imported) and
answers "does a 7B LoRA at rank 16 fit my 16 GB card?" before anything is downloaded.

    shapes   ModelShape (from a size name, an HF config or config.json), SIZES, lora_params
    setup    TrainSetup (what is trained and how) and the byte constants (NF4, ternary, optimizer states)
    weights  BaseWeights: the base's bytes per method, a quantized one as codes + scales + 16-bit parts
    cuda     device="cuda": lorafit's trainer on a GPU, term by term from what its code keeps alive
             (bf16 compute, NF4 or ternary base, fp32 adapters + AdamW, checkpointing, chunked loss, fused LoRA,
             cuBLAS workspace); `peak_allocated` is what torch.cuda.max_memory_allocated() should read
    cpu      device="cpu": peak RSS of an fp32 CPU process, with one fitted activation factor
    memory   estimate(setup) -> MemoryEstimate, whose terms sum to its total
    table    format_grid: sizes x ranks, fits or not, as `lorafit estimate` prints it; format_table:
             one row per size and rank, every term

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
    TERNARY_CODES_PER_BYTE,
    TERNARY_SCALE_BYTES,
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
from lorafit.train.estimate.table import MARKS, TABLE_RANKS, TABLE_SIZES, format_grid, format_table
from lorafit.train.estimate.weights import BaseWeights, base_weights, ternary_bytes, ternary_linear_bytes

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
    "MARKS",
    "METHODS",
    "MLP",
    "NF4_BYTES",
    "NF4_DOUBLE_QUANT_BYTES",
    "OPTIMIZER_BYTES",
    "SIZES",
    "TABLE_RANKS",
    "TABLE_SIZES",
    "TERMS",
    "TERNARY_CODES_PER_BYTE",
    "TERNARY_SCALE_BYTES",
    "BaseWeights",
    "CudaPeak",
    "MemoryEstimate",
    "ModelShape",
    "TrainSetup",
    "activation_bytes",
    "base_weights",
    "cuda_peak",
    "estimate",
    "format_grid",
    "format_table",
    "logits_bytes",
    "lora_params",
    "model_shape",
    "peak_allocated",
    "ternary_bytes",
    "ternary_linear_bytes",
]
