"""`TrainConfig`: the knobs of one fine-tuning run, each field with its docstring (the CLI's help);
`PreferenceConfig`: the losses of the preference methods (the `preference:` section), with TRL 1.16's
field names and defaults.

Data handling lives in `lorafit.train.data.DataConfig`, the adapter in `lorafit.config.LoraConfig`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from lorafit.config import LoraConfig
from lorafit.errors import LorafitError
from lorafit.train.trackers import check_report_to

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
PREFERENCE_METHODS = ("dpo", "orpo", "simpo", "kto")
METHODS = ("lora", "full", *PREFERENCE_METHODS)
NONFINITE = ("skip", "stop")
DISTRIBUTED = ("auto", "ddp", "fsdp")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
LOSS_TYPES = {"dpo": DPO_LOSS_TYPES, "kto": ("kto", "apo_zero_unpaired"), "simpo": ("simpo",), "orpo": ("orpo",)}


@dataclass
class PreferenceConfig:
    """The losses of `method: dpo | orpo | simpo | kto`, with TRL 1.16's names and defaults (the formulas
    are in lorafit.train.objectives.losses)."""

    beta: float = 0.1
    """DPO / KTO: how far the policy may move from the reference (larger: closer); the rewards are
    beta * (log pi - log pi_ref). IPO: the regularization tau. ORPO: the weight lambda of the odds-ratio
    term. SimPO: the reward scale."""
    loss_type: list[str] | str | None = None
    """dpo: one or more of sigmoid (default), hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard,
    aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm, summed with `loss_weights`
    (e.g. [sigmoid, bco_pair, sft] for MPO). kto: kto (default) or apo_zero_unpaired. simpo: simpo."""
    loss_weights: list[float] | None = None
    """One weight per loss_type (default 1.0 each)."""
    label_smoothing: float = 0.0
    """robust: the probability that a preference label is flipped, in [0, 0.5); exo_pair: its epsilon
    (must be > 0, e.g. 1e-3); aot, aot_unpaired and simpo: conservative label smoothing."""
    discopop_tau: float = 0.05
    """discopop: the temperature of the log-ratio modulation."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin gamma."""
    cpo_alpha: float = 1.0
    """simpo: the weight of the NLL of the chosen completion (the CPO form); 0 gives pure SimPO."""
    desirable_weight: float = 1.0
    """kto: the weight of desirable (label true) examples' losses."""
    undesirable_weight: float = 1.0
    """kto: the weight of undesirable (label false) examples' losses."""

    @classmethod
    def from_dict(cls, data: dict) -> PreferenceConfig:
        return cls(**data)

    def check(self, method: str) -> None:
        """Resolve the method's default loss_type and refuse what that method cannot compute."""
        allowed = LOSS_TYPES[method]
        if self.loss_type is None:
            self.loss_type = [allowed[0]]
        elif isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        if not self.loss_type:
            raise LorafitError(f"preference.loss_type: empty; use one of {', '.join(allowed)}")
        for name in self.loss_type:
            if name not in allowed:
                close = difflib.get_close_matches(str(name), allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise LorafitError(f"preference.loss_type: {name!r} is not a loss of method {method}; {hint}"
                                   f"use {', '.join(allowed)}")
        if method != "dpo" and len(self.loss_type) > 1:
            raise LorafitError(f"preference.loss_type: method {method} takes one loss type, got {self.loss_type}")
        if self.loss_weights is not None and not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in self.loss_weights):
            raise LorafitError(f"preference.loss_weights must be a list of numbers, got {self.loss_weights!r}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise LorafitError(f"preference.loss_weights has {len(self.loss_weights)} weight(s) for "
                               f"{len(self.loss_type)} loss type(s) {self.loss_type}: give one weight per loss type")
        if not self.beta > 0:
            raise LorafitError(f"preference.beta must be positive, got {self.beta!r}")
        if "exo_pair" in self.loss_type and not self.label_smoothing > 0:
            raise LorafitError("preference.label_smoothing must be > 0 for loss_type exo_pair (its epsilon; "
                               "the EXO paper suggests 1e-3)")
        if "robust" in self.loss_type and not 0 <= self.label_smoothing < 0.5:
            raise LorafitError(f"preference.label_smoothing must be in [0, 0.5) for loss_type robust, "
                               f"got {self.label_smoothing!r}")


@dataclass
class TrainConfig:
    """The knobs of one fine-tuning run (data handling lives in `lorafit.train.data.DataConfig`)."""

    output_dir: str = "runs/lorafit"
    """Where the adapter, checkpoints, metrics.jsonl and loss.png are written."""
    method: str = "lora"
    """What trains, and on what objective: "lora" (supervised fine-tuning of the adapter below on a
    frozen, optionally quantized base; written to adapter/), "full" (supervised, every weight: the
    baseline adapters are compared against; needs an unquantized base and ~4x the model's fp32 size;
    written to model/), or a preference method training the adapter on paired or unpaired preference
    data: "dpo" (and its loss family), "orpo", "simpo" or "kto" (the preference section). The lora
    section is ignored with "full"."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter to train (ignored when `adapter` starts from an existing one)."""
    adapter: str | None = None
    """Start from this PEFT-format adapter folder (ours or PEFT's) instead of a new adapter: continued
    training for lora, or preference training on top of an SFT adapter. Its files say its rank and targets."""
    ref_adapter: str | None = None
    """Preference methods: the reference policy is this adapter on the same base (held as a second,
    frozen adapter slot). Default: the start `adapter` when there is one, else the base with adapters disabled."""
    precompute_ref_log_probs: bool = False
    """Preference methods: compute the reference log-probs of every sample once, before training, and cache
    them in output_dir (keyed by the data, the base and the reference, so a change recomputes them)."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """The preference losses (method dpo, orpo, simpo or kto)."""
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
        if isinstance(self.preference, dict):
            self.preference = PreferenceConfig.from_dict(self.preference)
        if self.method not in METHODS:
            raise LorafitError(f"TrainConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.method in PREFERENCE_METHODS:
            self.preference.check(self.method)
        elif self.ref_adapter or self.precompute_ref_log_probs:
            raise LorafitError(f"ref_adapter and precompute_ref_log_probs apply to the preference methods "
                               f"({', '.join(PREFERENCE_METHODS)}), not to method {self.method}")
        if self.method == "full" and self.adapter:
            raise LorafitError("adapter: method full trains every weight of the base; an adapter to start from "
                               "applies to the adapter methods")
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
