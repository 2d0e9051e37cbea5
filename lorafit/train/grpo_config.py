"""`GRPOConfig`: the `grpo:` section of a run (method grpo), with TRL 1.16's field names, defaults and
formulas (TRL's `GRPOConfig`); the objective itself is lorafit.train.objectives.grpo.

Notation: a micro-batch holds batch_size / G prompts, each with G = num_generations completions o_i;
r_i is completion i's reward, pi_theta the adapter being trained, pi_old the policy that sampled o_i
(the same weights, unless the rollouts are reused: num_iterations > 1 or steps_per_generation > grad_accum),
pi_ref the reference (the base with adapters disabled, or the start adapter), m_{i,t} the completion mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafit.errors import LorafitError

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")


@dataclass
class GRPOConfig:
    """Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath"), TRL 1.16's names and defaults."""

    reward_funcs: list[str | dict] = field(default_factory=list)
    """The reward functions, summed with `reward_weights` into r_i: each `module:function`,
    `path/to/file.py:function`, or a shipped one (exact_match, regex_match, length_target, json_valid; see
    lorafit.train.rewards); a mapping `{name: <one of those>, <keyword>: <value>, ...}` passes keywords to
    it (e.g. `{name: exact_match, column: answer}`). TRL's signature: f(prompts, completions, ...) ->
    list[float | None], the data file's other fields arriving as keyword arguments; a None reward is left out."""
    reward_weights: list[float] | None = None
    """One weight per reward function (default 1.0 each): r_i = sum_k w_k r_{i,k} (None terms left out)."""
    num_generations: int = 8
    """G, completions sampled per prompt (at least 2: the advantage compares them). batch_size counts
    completions, so it must be a multiple of G."""
    max_completion_length: int = 512
    """Most tokens a completion may have; one that reaches it without its end token is truncated."""
    temperature: float = 1.0
    """Sampling temperature T; the trainer scores tokens under softmax(logits / T), the distribution they
    came from."""
    top_p: float = 1.0
    """Sample from the nucleus: the likeliest tokens whose probabilities first reach top_p (1: all)."""
    top_k: int = 0
    """Sample among the top_k likeliest tokens (0: no limit)."""
    min_p: float | None = None
    """Drop tokens less likely than min_p times the likeliest one (None: keep all)."""
    loss_type: str = "dapo"
    """How token losses l_{i,t} become the loss: "grpo": mean over completions of each one's token mean,
    (1/N) sum_i (1/|o_i|) sum_t l_{i,t} (biased toward short right answers and long wrong ones); "bnpo":
    sum_{i,t} l_{i,t} / sum_{i,t} m_{i,t} per micro-batch (its tokens over every process); "dr_grpo" (Dr.
    GRPO, Liu et al. 2025): sum_{i,t} l_{i,t} / (N * max_completion_length); "dapo" (DAPO, Yu et al. 2025;
    the default): sum_{i,t} l_{i,t} / the tokens of the whole generation batch (every process)."""
    epsilon: float = 0.2
    """Lower clip: the ratio rho = pi_theta / pi_old is clipped to [1 - epsilon, 1 + epsilon_high], and
    l_{i,t} = -min(rho A_i, clip(rho) A_i) (PPO's clipped surrogate, Schulman et al. 2017)."""
    epsilon_high: float | None = None
    """Upper clip (None: epsilon). DAPO's clip-higher recommends 0.28."""
    delta: float | None = None
    """Two-sided clipping (INTELLECT-2): the unclipped term is also capped, min(rho, delta) A_i; None: off.
    Should exceed 1 + epsilon."""
    importance_sampling_level: str = "token"
    """"token": rho per token, exp(log pi_theta - log pi_old); "sequence" (GSPO, Zheng et al. 2025): one
    rho per completion, exp(mean over its tokens of the log-ratio)."""
    beta: float = 0.0
    """Weight of the KL penalty to the reference, added per token: beta * (exp(ref - logp) - (ref - logp) - 1)
    (Schulman's k3 estimator); 0: no reference forward at all."""
    use_bias_correction_kl: bool = True
    """With beta > 0, multiply the k3 term by the importance ratio rho (DeepSeek-V3.2): its gradient is then
    the unbiased reverse-KL gradient (rho is differentiable, so this changes the gradient even where rho = 1)."""
    scale_rewards: str | bool = "group"
    """Advantages A_i = (r_i - mean of its group) / (std + 1e-4), the std over: "group" (its G completions),
    "batch" (the whole generation batch: Dr. GRPO / PPO Lite), or "none" (A_i = r_i - mean, no division).
    true / false are read as group / none."""
    num_iterations: int = 1
    """mu: optimizer passes over each generation batch before sampling again (pi_old then differs from
    pi_theta on the later passes, and the clipping matters)."""
    steps_per_generation: int | None = None
    """Micro-batches one generation batch holds (None: grad_accum, one generation per optimizer step):
    batch_size * steps_per_generation completions are sampled together, their advantages computed over
    all of them."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_completion_length out of the loss (DAPO's overlong filtering)."""

    @classmethod
    def from_dict(cls, data: dict) -> GRPOConfig:
        return cls(**data)

    def check(self, batch_size: int, grad_accum: int) -> None:
        """Refuse settings GRPO cannot run, in one line naming the field; fill the derived defaults."""
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise LorafitError(f"grpo.num_generations must be at least 2 (the advantage compares the completions "
                               f"of one prompt), got {self.num_generations!r}")
        if batch_size % self.num_generations:
            raise LorafitError(f"batch_size {batch_size} is not divisible by grpo.num_generations "
                               f"{self.num_generations}: batch_size counts completions and a micro-batch holds whole "
                               f"groups; use a multiple of {self.num_generations}")
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise LorafitError(f"grpo.loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise LorafitError(f"grpo.scale_rewards must be one of {', '.join(SCALE_REWARDS)}, "
                               f"got {self.scale_rewards!r}")
        if self.importance_sampling_level not in IMPORTANCE_LEVELS:
            raise LorafitError(f"grpo.importance_sampling_level must be token or sequence, "
                               f"got {self.importance_sampling_level!r}")
        for name in ("max_completion_length", "num_iterations", "steps_per_generation"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise LorafitError(f"grpo.{name} must be a positive integer, got {value!r}")
        if self.top_k < 0:
            raise LorafitError(f"grpo.top_k must be 0 (no limit) or positive, got {self.top_k!r}")
        if not self.temperature > 0:
            raise LorafitError(f"grpo.temperature must be positive (GRPO samples), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise LorafitError(f"grpo.top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise LorafitError(f"grpo.min_p must be in [0, 1], got {self.min_p!r}")
        if not self.epsilon >= 0 or (self.epsilon_high is not None and not self.epsilon_high >= 0):
            raise LorafitError("grpo.epsilon and grpo.epsilon_high must be non-negative")
        if self.delta is not None and not self.delta > 0:
            raise LorafitError(f"grpo.delta must be positive (e.g. 1 + 2 epsilon), got {self.delta!r}")
        if not self.beta >= 0:
            raise LorafitError(f"grpo.beta must be 0 (no KL term) or positive, got {self.beta!r}")
        if not self.reward_funcs:
            raise LorafitError("grpo.reward_funcs is empty: give at least one reward function, e.g. "
                               "reward_funcs: [{name: exact_match, column: answer}] or [my_rewards.py:score]")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise LorafitError(f"grpo.reward_weights has {len(self.reward_weights)} weight(s) for "
                               f"{len(self.reward_funcs)} reward function(s): give one weight per function")
        self.steps_per_generation = self.steps_per_generation or grad_accum

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high
