"""`TrainConfig`: the knobs of one fine-tuning run, each field with its docstring (the CLI's help).

Data handling lives in `lorafit.train.data.DataConfig`, the adapter in `lorafit.config.LoraConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafit.config import LoraConfig
from lorafit.errors import LorafitError
from lorafit.train.trackers import check_report_to

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
METHODS = ("lora", "full")
NONFINITE = ("skip", "stop")
DISTRIBUTED = ("auto", "ddp", "fsdp")


@dataclass
class TrainConfig:
    """The knobs of one fine-tuning run (data handling lives in `lorafit.train.data.DataConfig`)."""

    output_dir: str = "runs/lorafit"
    """Where the adapter, checkpoints, metrics.jsonl and loss.png are written."""
    method: str = "lora"
    """What trains: "lora" (the adapter below on a frozen, optionally quantized base; written to adapter/)
    or "full" (every weight: full fine-tuning, the baseline adapters are compared against; needs an
    unquantized base and ~4x the model's fp32 size for weights, gradients and AdamW states; written to
    model/ as a full model folder). The lora section is ignored with "full"."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter to train."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs."""
    batch_size: int = 8
    """Samples per micro-batch, over all processes of a distributed run (each of N takes
    batch_size / N of them, so a run gives the same steps on any number of processes)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    learning_rate: float = 2e-4
    """Peak learning rate; 1e-4 to 3e-4 is usual for LoRA, small tasks tolerate more."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""
    warmup_ratio: float = 0.05
    """Share of the steps spent warming the learning rate up linearly from 0 (3-10% is usual)."""
    schedule: str = "cosine"
    """Decay after warmup: "cosine", "linear" or "constant"."""
    optimizer: str = "adamw"
    """"adamw" (torch), or bitsandbytes' "adamw8bit" / "paged_adamw8bit" (states in 8 bits)."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (Hayou et al. 2024): B's learning rate is this times A's (about 16 is the paper's
    suggestion); None trains both at learning_rate."""
    max_grad_norm: float | None = 1.0
    """Clip the adapter gradients' global norm (None: no clipping)."""
    nonfinite: str = "skip"
    """A step whose loss or gradient norm (before clipping) is inf or nan: "skip" it (the adapter and
    the optimizer state are left as they were, the data position and the schedule move on, the step is
    counted and logged with "nonfinite": true), or "stop" the run there, after writing a checkpoint."""
    max_nonfinite_steps: int = 3
    """With nonfinite: skip, this many non-finite steps in a row stop the run (after writing a
    checkpoint of the last good adapter and optimizer state, which --resume continues from)."""
    gradient_checkpointing: bool | None = None
    """Recompute block activations in backward: much less memory for ~30% more compute. None: on for
    a model on a GPU (where memory is what runs out), off on the CPU."""
    offload_activations: bool = False
    """With gradient checkpointing, keep each block's saved input in pinned host memory (GPU runs)."""
    fused_lora: bool = True
    """Run each adapted linear layer as one fused autograd Function (lorafit.ops.fused_lora): same
    numbers as the module path, less kept for backward, 16-bit low-rank matmuls on CUDA."""
    fused_mlp: bool = True
    """Run SiLU-gated MLPs (Llama, Mistral, Qwen...) as lorafit.train.fusion.GatedMLP: same weights and
    numbers, two fewer (tokens x intermediate) activations kept per layer for backward."""
    fused_norm: bool = True
    """On CUDA, run RMSNorms as one Triton kernel each way (lorafit.train.fusion.FusedRMSNorm)."""
    eval_steps: int | None = None
    """Evaluate on the validation samples every N steps. With validation samples the last step is
    always evaluated (null: only that one)."""
    eval_batch_size: int | None = None
    """Validation samples per forward (None: batch_size). Larger is faster where memory allows: no
    backward, and a quantized base is dequantized once per forward."""
    save_steps: int | None = None
    """Write a resumable checkpoint every N steps (an interrupted run, Ctrl-C, writes one either way)."""
    save_total_limit: int = 2
    """Keep only the newest N checkpoints, and the one with the best validation loss besides."""
    load_best_at_end: bool = False
    """At the end, make adapter/ (or model/) the checkpoint with the lowest validation loss, when it
    beats the final weights. Needs eval_steps and save_steps, save_steps a multiple of eval_steps (so
    every checkpoint has its validation loss), and validation data."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a new best validation loss."""
    logging_steps: int = 1
    """Refresh the progress bar every N steps (metrics.jsonl gets every step)."""
    report_to: list[str] | str | None = None
    """Experiment trackers that also get every step's metrics, under the HF Trainer's names (train/loss,
    eval/loss, ...), with this config as hyperparameters: any of tensorboard (output_dir/runs/), mlflow
    ($MLFLOW_TRACKING_URI, else sqlite:///output_dir/mlflow.db), wandb (in $WANDB_MODE; offline needs no
    network), trackio (local). Each is an extra: pip install 'lorafit[tensorboard]'. None: metrics.jsonl only."""
    seed: int = 0
    """Seeds adapter init, dropout and the data order."""
    distributed: str = "auto"
    """With several processes (torchrun, or --nproc-per-node): "ddp" (every GPU holds the whole model),
    "fsdp" (FSDP2: the base, NF4 included, the adapters and their optimizer states sharded over the
    GPUs), or "auto": fsdp when a DDP process would not fit its device by lorafit's estimate, else ddp."""
    collective_timeout: float = 600.0
    """With several processes: seconds a process waits for the others in a collective before the run
    fails (so that a dead or hung process stops the run instead of hanging it). Applies when lorafit
    starts the process group; one you started yourself keeps its own timeout."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraConfig.from_dict(self.lora)
        if self.method not in METHODS:
            raise LorafitError(f"TrainConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.schedule not in SCHEDULES:
            raise LorafitError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.distributed not in DISTRIBUTED:
            raise LorafitError(f"TrainConfig.distributed must be one of {DISTRIBUTED}, got {self.distributed!r}")
        if not self.collective_timeout > 0:
            raise LorafitError(f"TrainConfig.collective_timeout must be positive, got {self.collective_timeout!r}")
        if self.nonfinite not in NONFINITE:
            raise LorafitError(f"TrainConfig.nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}")
        if self.optimizer not in OPTIMIZERS:
            raise LorafitError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("batch_size", "grad_accum", "logging_steps", "save_total_limit", "max_nonfinite_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LorafitError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("max_steps", "eval_steps", "eval_batch_size", "save_steps", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise LorafitError(f"TrainConfig.{name} must be a positive integer or null, got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise LorafitError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not self.learning_rate > 0:
            raise LorafitError(f"TrainConfig.learning_rate must be positive, got {self.learning_rate!r}")
        if self.loraplus_lr_ratio is not None and (isinstance(self.loraplus_lr_ratio, bool) or not isinstance(
                self.loraplus_lr_ratio, (int, float)) or not self.loraplus_lr_ratio > 0):
            raise LorafitError(f"TrainConfig.loraplus_lr_ratio must be a positive number or null, "
                               f"got {self.loraplus_lr_ratio!r}")
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to == "none" else [self.report_to]
        self.report_to = list(self.report_to or [])
        check_report_to(self.report_to)
        if self.epochs <= 0:
            raise LorafitError(f"TrainConfig.epochs must be positive, got {self.epochs!r}")
        if self.load_best_at_end and not (self.eval_steps and self.save_steps and self.save_steps % self.eval_steps == 0):
            raise LorafitError(f"TrainConfig.load_best_at_end needs eval_steps and save_steps with save_steps a multiple "
                               f"of eval_steps (so each checkpoint has its validation loss), got eval_steps="
                               f"{self.eval_steps}, save_steps={self.save_steps}")
