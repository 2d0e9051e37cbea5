"""Typed configuration for adapters.

One dataclass per concern; every field has a docstring and `__post_init__` checks it, so a bad
value fails where it is written, with the field's name, not deep inside training.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lorafit.errors import LorafitError

BIAS_MODES = ("none", "lora_only", "all")
INIT_MODES = ("kaiming", "gaussian", "pissa", "zeros", "random")
DEFAULT_ADAPTER = "default"  # the adapter name when none is given (PEFT's too)
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def check_adapter_name(name: str) -> str:
    """`name` if it is a valid adapter name (1-64 letters, digits, '_' or '-'; no dots, since names
    become parts of module and file keys), else a LorafitError saying so."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise LorafitError(f"adapter name {name!r} must be 1-64 letters, digits, '_' or '-' (no dots or spaces)")
    return name


@dataclass
class LoraConfig:
    """What to adapt and how.

    The defaults give classic LoRA (Hu et al. 2021): rank 16, alpha = r (scaling 1), no dropout,
    A kaiming-uniform and B zero so the adapted model equals the base at step 0.
    """

    r: int = 16
    """Rank of the update BA. 4-64 is typical; memory and compute grow linearly with it."""

    alpha: float | None = None
    """Scaling numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with rsLoRA). None means alpha = r."""

    dropout: float = 0.0
    """Dropout on the adapter's input (not on the base path). 0.0-0.1 is typical."""

    target_modules: list[str] | str | None = None
    """Module names (a name matches itself or any path ending in '.name'), a regex string matched
    against the full module path, or "all-linear" (every linear layer except the output head).
    None picks the model family's defaults (see lorafit.lora.targets)."""

    bias: str = "none"
    """Which biases train: "none", "lora_only" (biases of adapted layers) or "all"."""

    use_rslora: bool = False
    """Rank-stabilised LoRA (Kalajdzievski 2023): scaling alpha/sqrt(r), so larger ranks keep learning."""

    use_dora: bool = False
    """DoRA (Liu et al. 2024): a learned per-output magnitude times the normalised W + scaling*BA."""

    init: str = "kaiming"
    """How A and B start: "kaiming" (A kaiming-uniform, B zero; PEFT's default), "gaussian"
    (A ~ N(0, 1/r), B zero), "pissa" (A, B from the top-r singular vectors of W; W becomes the
    residual, so the output is unchanged), "zeros" (both zero: a placeholder that a load fills),
    "random" (both random: the model changes at init; for tests)."""

    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: regex on the module path (matched at the end of the path) -> r."""

    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, same matching as rank_pattern."""

    layers_to_transform: list[int] | None = None
    """Only adapt blocks with these indices (the number after `.layers.`, `.h.` or `.layer.`)."""

    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a new classification head)."""

    target_parameters: list[str] | None = None
    """3-D expert weights of MoE models to adapt, one low-rank pair per expert (lorafit.lora.experts):
    'experts.gate_up_proj', 'experts.down_proj', ... (an entry matches `module_path.param` equal to it
    or ending in '.entry', PEFT's rule). With target_parameters and no target_modules only the
    experts are adapted. No dropout or DoRA there."""

    def __post_init__(self) -> None:
        if self.target_parameters is not None:
            self.target_parameters = list(self.target_parameters)
            if not self.target_parameters or not all(isinstance(t, str) and t for t in self.target_parameters):
                raise LorafitError("LoraConfig.target_parameters must be a non-empty list of parameter names")
            if self.dropout or self.use_dora or self.init == "pissa":
                raise LorafitError("LoraConfig.target_parameters: dropout, use_dora and init='pissa' do not apply "
                                   "to expert weights; set dropout=0, use_dora=False and another init")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise LorafitError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if self.alpha is None:
            self.alpha = float(self.r)
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise LorafitError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise LorafitError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise LorafitError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init not in INIT_MODES:
            raise LorafitError(f"LoraConfig.init must be one of {INIT_MODES}, got {self.init!r}")
        if self.init == "pissa" and self.use_dora:
            raise LorafitError("LoraConfig.init='pissa' cannot be combined with use_dora=True")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise LorafitError("LoraConfig.target_modules must be a non-empty list of module names")
        elif isinstance(self.target_modules, str):
            _check_regex("target_modules", self.target_modules)
        elif self.target_modules is not None:
            raise LorafitError(
                f"LoraConfig.target_modules must be a list of names, a regex or 'all-linear', got {self.target_modules!r}"
            )
        for name, pattern, kind in (("rank_pattern", self.rank_pattern, int), ("alpha_pattern", self.alpha_pattern, (int, float))):
            if not isinstance(pattern, dict):
                raise LorafitError(f"LoraConfig.{name} must be a mapping of regex -> value, got {pattern!r}")
            for key, value in pattern.items():
                _check_regex(f"{name}[{key!r}]", key)
                if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
                    raise LorafitError(f"LoraConfig.{name}[{key!r}] must be a positive number, got {value!r}")
        if self.layers_to_transform is not None:
            if isinstance(self.layers_to_transform, int):
                self.layers_to_transform = [self.layers_to_transform]
            if not all(isinstance(i, int) and i >= 0 for i in self.layers_to_transform):
                raise LorafitError(
                    f"LoraConfig.layers_to_transform must be a list of non-negative ints, got {self.layers_to_transform!r}"
                )
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def rank_for(self, module_name: str) -> int:
        """Rank for one module path, honouring rank_pattern (first matching key wins)."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)

    def scaling_for(self, module_name: str) -> float:
        """The update's multiplier for one module path (rank and alpha patterns applied)."""
        return lora_scaling(self.alpha_for(module_name), self.rank_for(module_name), self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LorafitError(f"LoraConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The LoRA update's multiplier: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA
    (Kalajdzievski 2023). The one place this formula is written."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise LorafitError(f"LoraConfig.{name}: {pattern!r} is not a valid regex ({e})") from None


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rule: a key matches when the module path ends with it (as a regex, on a '.' boundary)."""
    for key in patterns:
        if re.fullmatch(rf"(.*\.)?(?:{key})", module_name):
            return key
    return None


@dataclass
class IA3Config:
    """(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
    In-Context Learning"): one learned vector per adapted layer that rescales its output (keys,
    values) or, for feed-forward layers, its input. PEFT's `IA3Config`, same field names."""

    target_modules: list[str] | str | None = None
    """Modules to rescale: names, a regex, or None for the family's defaults (k, v and the MLP's down
    projection, as PEFT picks them)."""

    feedforward_modules: list[str] | str | None = None
    """The subset of target_modules whose *input* is scaled (y = W (l ⊙ x)); the others scale their
    output (y = l ⊙ W x). None: the family's default (the MLP down projection)."""

    fan_in_fan_out: bool = False
    """PEFT's flag for bases that store weights (in, out) (GPT-2's Conv1D). lorafit reads the layout
    from the base itself; the flag is kept so a saved file tells PEFT the truth."""

    init_ia3_weights: bool = True
    """Start every vector at 1 (the model is unchanged at step 0); False starts them random (tests)."""

    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter."""

    bias = "none"  # (IA)³ trains no bias; read by lorafit.lora.inject like LoraConfig.bias

    def __post_init__(self) -> None:
        for name in ("target_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)):
                value = list(value)
                if not all(isinstance(t, str) and t for t in value):
                    raise LorafitError(f"IA3Config.{name} must be a list of module names, got {value!r}")
                setattr(self, name, value)
            elif isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as e:
                    raise LorafitError(f"IA3Config.{name}: {value!r} is not a valid regex ({e})") from None
            elif value is not None:
                raise LorafitError(f"IA3Config.{name} must be a list of names or a regex, got {value!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise LorafitError("IA3Config.target_modules must not be empty")
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = [f for f in self.feedforward_modules if f not in self.target_modules]
            if extra:
                raise LorafitError(f"IA3Config.feedforward_modules {extra} are not in target_modules; "
                                   "every feed-forward module must also be a target")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AdaLoraConfig:
    """AdaLoRA (Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
    Fine-Tuning", ICLR; arXiv:2303.10512): each update is P Λ Q in SVD form and an importance-based
    allocator prunes singular values from init_r per layer down to a total budget of target_r per
    layer on average (lorafit.lora.adalora, lorafit.lora.allocator). PEFT's AdaLoraConfig, same names."""

    init_r: int = 12
    """Rank every adapted layer starts with."""

    target_r: int = 8
    """Average rank per layer at the end: the final budget is target_r x (number of adapted layers)."""

    tinit: int = 0
    """Steps of warm-up before any pruning (the full init_r budget)."""

    tfinal: int = 0
    """Last steps that train with the final, fixed rank pattern."""

    deltaT: int = 1
    """Between tinit and total_step - tfinal, the budget is re-allocated every deltaT steps."""

    beta1: float = 0.85
    """EMA coefficient of the sensitivity |w · grad| (importance smoothing)."""

    beta2: float = 0.85
    """EMA coefficient of its uncertainty |I - Ī|."""

    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regularizer ||PᵀP - I||_F + ||QQᵀ - I||_F added to the loss."""

    total_step: int | None = None
    """Training steps of the run (the budget schedule needs it; the Trainer fills it in when None)."""

    alpha: float = 8.0
    """Scaling numerator: the update is multiplied by alpha / init_r (PEFT's lora_alpha, default 8)."""

    dropout: float = 0.0
    """Dropout on the adapter's input."""

    target_modules: list[str] | str | None = None
    """As LoraConfig.target_modules (None: the family's defaults)."""

    rank_pattern: dict[str, list[bool]] | None = None
    """The allocator's result: module path -> which of the init_r triplets are kept. Set by training,
    saved and read with the adapter (an adapter file keeps only the kept triplets)."""

    bias = "none"  # AdaLoRA adapters here train no bias; read by lorafit.lora.inject like LoraConfig.bias

    def __post_init__(self) -> None:
        for name in ("init_r", "target_r", "deltaT"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LorafitError(f"AdaLoraConfig.{name} must be a positive integer, got {value!r}")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise LorafitError(f"AdaLoraConfig.{name} must be a non-negative integer, got {value!r}")
        if self.target_r > self.init_r:
            raise LorafitError(f"AdaLoraConfig.target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise LorafitError(f"AdaLoraConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            raise LorafitError(f"AdaLoraConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise LorafitError(f"AdaLoraConfig.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise LorafitError(f"AdaLoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: int) -> None:
        """The schedule needs tinit < total_step - tfinal (a pruning phase of at least one step)."""
        if not isinstance(total_step, int) or total_step <= 0:
            raise LorafitError(f"AdaLoraConfig.total_step must be a positive integer, got {total_step!r}")
        if self.tinit >= total_step - self.tfinal:
            raise LorafitError(f"AdaLoraConfig: tinit ({self.tinit}) must be below total_step - tfinal "
                               f"({total_step} - {self.tfinal}); shorten tinit/tfinal or train longer")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
