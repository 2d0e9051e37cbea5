"""GRPO against TRL 1.16's real GRPOTrainer, fp32, on fixed prompts, completions and rewards.

TRL's trainer is built offline on a tiny Llama with a PEFT adapter; its sampling (`_generate`) is replaced
by a function returning the fixed completions, so TRL's own `_generate_and_score_completions` computes the
rewards, advantages, masks, pi_old's and the reference's log-probs, and its own `_compute_loss` the loss,
its gradients and metrics. lorafit's GRPO objective gets the same completions from a rollout function
returning them (its sampler), and the same adapter files. Compared: the advantages (group, batch and none
scaling, with None rewards), `mask_truncated_completions`, and for every loss type the loss (1e-5), the LoRA
gradients (1e-4 relative) and the metrics, with token and sequence importance sampling, epsilon_high 0.28,
delta, beta > 0, temperature 0.7, num_iterations 2 and an accumulation window of 2 micro-batches.

TRL lets the model count positions from the start of each left-padded row; lorafit counts them from each
row's first token, as its serving engine does. RoPE is relative, so the two agree in exact arithmetic, but
in fp32 they differ by up to ~1e-5 in log-prob on the larger adapter below; TRL's forward is given lorafit's
positions (a pre-hook) so that what is compared is the objective's math, not that rounding.

For num_iterations 2 both trainers move to a second adapter after sampling (what the optimizer step between
the two passes does), so pi_theta differs from pi_old and the clipping is exercised.
"""

from __future__ import annotations

import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (trl's own dependency)
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trl.trainer.utils import split_tensor_dict  # noqa: E402

from lorafit.io import load_adapter  # noqa: E402
from lorafit.train.config import TrainConfig  # noqa: E402
from lorafit.train.data import PromptSample  # noqa: E402
from lorafit.train.objectives.grpo import GRPO  # noqa: E402
from lorafit.train.objectives.rollout import Completion  # noqa: E402
from lorafit.train.prepare import REFERENCE  # noqa: E402
from lorafit.train.rewards import load_reward  # noqa: E402
from tests.parity.test_trl_preference import tiny_base  # noqa: E402

TOL, GRAD_TOL = 1e-5, 1e-4
G, MAX_LEN = 4, 6
PROMPTS = ["Write the date 3 March 1998 as an ISO date:", "Two plus two is", "The capital of France is",
           "Name a primary colour:"]
# rewards per (prompt, completion): None is a reward the function leaves out; the second prompt's first
# function ties (zero std), the third prompt's completion 2 gets no reward from either function (unscorable)
REWARDS_A = [[1.0, 0.0, 0.5, None], [1.0, 1.0, 1.0, 1.0], [0.2, 0.9, None, 0.4], [0.0, 1.0, 1.0, 0.0]]
REWARDS_B = [[0.5, 0.1, None, 0.3], [None, 0.2, 0.8, 0.1], [0.7, 0.0, None, 0.6], [0.3, 0.3, 0.9, 0.2]]


def random_adapter(path, seed: int, std: float = 0.2) -> None:
    model = get_peft_model(tiny_base(), PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """(the adapter that samples, the adapter after an update): two random PEFT adapters."""
    root = tmp_path_factory.mktemp("grpo-adapters")
    random_adapter(root / "p0", 1)
    random_adapter(root / "p1", 2, std=0.5)  # far enough from p0 that sequence-level ratios leave the clip range
    return root / "p0", root / "p1"


@pytest.fixture(scope="module")
def completions(tok):
    """Fixed completion ids per prompt: some end with EOS, some run to MAX_LEN (truncated), lengths vary."""
    g = torch.Generator().manual_seed(7)
    eos = tok.eos_token_id
    out = []
    for p in range(len(PROMPTS)):
        rows = []
        for i in range(G):
            n = [3, MAX_LEN, 2, 5][(p + i) % 4]
            ids = torch.randint(100, 5000, (n,), generator=g).tolist()
            if n < MAX_LEN:
                ids = ids[:-1] + [eos]
            rows.append(ids)
        out.append(rows)
    return out


REWARDS_FILE = """
TABLES = {}  # completion ids -> (reward a, reward b), filled by the test


def table_a(prompts, completions, completion_ids, **kwargs):
    return [TABLES[tuple(ids)][0] for ids in completion_ids]


def table_b(prompts, completions, completion_ids, **kwargs):
    return [TABLES[tuple(ids)][1] for ids in completion_ids]
"""


@pytest.fixture(scope="module")
def rewards(tmp_path_factory, completions):
    """The two reward functions (a file lorafit loads by path; TRL gets the very same functions), returning
    the fixed tables, looked up by the completion's ids."""
    path = tmp_path_factory.mktemp("rewards") / "fixed_rewards.py"
    path.write_text(REWARDS_FILE)
    specs = [f"{path}:table_a", f"{path}:table_b"]
    funcs = [load_reward(spec).func for spec in specs]
    tables = funcs[0].__globals__["TABLES"]
    for p, rows in enumerate(completions):
        for i, ids in enumerate(rows):
            tables[tuple(ids)] = (REWARDS_A[p][i], REWARDS_B[p][i])
    return specs, funcs


def trl_trainer(tok, adapters, rewards, tmp_path, batch=16, **kw):
    """TRL's GRPOTrainer on the tiny Llama with adapter p0 (beta > 0: TRL adds its "ref" copy of it)."""
    args = dict(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[], gradient_checkpointing=False,
                num_generations=G, max_completion_length=MAX_LEN, per_device_train_batch_size=batch, **kw)
    data = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(tiny_base(), adapters[0], is_trainable=True)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=rewards[1], args=trl.GRPOConfig(**args),
                                  train_dataset=data, processing_class=tok)
    trainer.model.register_forward_pre_hook(positions_from_first_token, with_kwargs=True)
    return trainer


def positions_from_first_token(module, args, kwargs):
    """Position ids counted from each row's first real token (lorafit's convention; see the docstring)."""
    if "attention_mask" in kwargs and kwargs.get("position_ids") is None:
        kwargs["position_ids"] = (kwargs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return args, kwargs


def trl_generation(trainer, tok, completions) -> dict:
    """TRL's generation batch of the prompts (G each, prompt-major) with the fixed completions."""
    ids = [tok(p)["input_ids"] for p in PROMPTS for _ in range(G)]
    comp = [c for rows in completions for c in rows]

    def fixed(prompts):
        return ids, comp, None, tok.batch_decode(comp, skip_special_tokens=True), None, {}, None, []

    trainer._generate = fixed
    trainer._metrics["train"].clear()
    trainer.model.train()
    return trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])


class FixedRollouts:
    """lorafit's sampler replaced by the fixed completions (the engine's own log-probs are tested elsewhere)."""

    def __init__(self, completions, prompt_ids):
        self.completions, self.prompt_ids = completions, prompt_ids

    def __call__(self, prompts, seeds):
        out, seen = [], {}
        for ids in prompts:
            p = self.prompt_ids.index(ids)
            i = seen.get(p, 0)
            seen[p] = i + 1
            c = self.completions[p][i]
            out.append(Completion(c, [0.0] * len(c), c[-1] != EOS))
        return out


EOS = 2  # SmolLM2's <|im_end|>, checked in `test_the_batches_hold_trls_ids_and_masks`


def lorafit_setup(tok, adapters, completions, rewards, tmp_path, batch=16, grad_accum=1, reference=False, **grpo):
    """lorafit's model (adapter p0; a copy of it as the reference slot when `reference`), GRPO objective, prompts."""
    model = tiny_base()
    if reference:
        load_adapter(model, adapters[0], REFERENCE, activate=False)
    load_adapter(model, adapters[0])
    model.train()
    cfg = TrainConfig(output_dir=str(tmp_path / "ours"), method="grpo", batch_size=batch, grad_accum=grad_accum,
                      grpo={"num_generations": G, "max_completion_length": MAX_LEN, "reward_funcs": rewards[0], **grpo})
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    samples = [PromptSample(ids, p, {}, f"prompt {i}") for i, (ids, p) in enumerate(zip(prompt_ids, PROMPTS))]
    objective = GRPO(cfg, tok, REFERENCE if reference else None, rollouts=FixedRollouts(completions, prompt_ids))
    return model, objective, samples


def lorafit_batches(objective, model, samples, tok, grad_accum=1) -> list[dict]:
    """The micro-batches of one optimizer step (all prompts drawn by the first step)."""
    per = len(samples) // (objective.spg)
    micro = [samples[i * per:(i + 1) * per] for i in range(objective.spg)]
    return objective.batches(model, micro, tok.pad_token_id)


def set_adapter(model, path) -> None:
    """Replace the trained adapter's weights ("default") by those of the PEFT file at `path`."""
    weights = load_file(str(path / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" not in name or ".default" not in name:
                continue
            key = ("" if name.startswith("base_model.model.") else "base_model.model.") + name
            key = key.replace(".default.weight", ".weight")  # PEFT's name; lorafit's ends in .lora_A.default
            p.copy_(weights[key[:-len(".default")] + ".weight" if key.endswith(".default") else key])


def grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None and "lora_" in name:
            key = name.replace("base_model.model.", "").replace(".default.weight", "").replace(".default", "")
            out[key.replace(".base_layer", "")] = p.grad.detach().clone()
    return out


def assert_grads_close(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        err = (ours[key] - theirs[key]).abs().max() / theirs[key].abs().max().clamp(min=1e-12)
        assert err <= GRAD_TOL, (key, err.item())


def close(a: float, b: float, tol: float = TOL) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


# -- advantages and masks ------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_and_reward_metrics_equal_trl(scale, tok, adapters, completions, rewards, tmp_path):
    """Weighted rewards with None entries, a tied group and an unscorable completion: TRL's advantages."""
    trainer = trl_trainer(tok, adapters, rewards, tmp_path, scale_rewards=scale, reward_weights=[1.0, 0.5])
    theirs = trl_generation(trainer, tok, completions)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    model, objective, samples = lorafit_setup(tok, adapters, completions, rewards, tmp_path, scale_rewards=scale,
                                              reward_weights=[1.0, 0.5])
    [batch] = lorafit_batches(objective, model, samples, tok)
    torch.testing.assert_close(batch["advantages"], theirs["advantages"], rtol=1e-6, atol=1e-6)
    assert (batch["advantages"] != 0).sum() >= 8  # the scales matter: most completions carry signal
    ours = {name: float(v[0]) for name, v in zip(objective.gen_names, batch["gen_metrics"]) if v[1] > 0}
    names = ["reward", "reward_std", "frac_reward_zero_std", "rewards/table_a/mean", "rewards/table_a/std",
             "rewards/table_b/mean", "rewards/table_b/std"]
    for name in names:
        assert close(ours[name], trl_metrics[name]), (name, ours[name], trl_metrics[name])


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_the_batches_hold_trls_ids_and_masks(mask_truncated, tok, adapters, completions, rewards, tmp_path):
    """Prompt and completion ids, and the completion mask, `mask_truncated_completions` on and off."""
    assert tok.eos_token_id == EOS
    trainer = trl_trainer(tok, adapters, rewards, tmp_path, mask_truncated_completions=mask_truncated)
    theirs = trl_generation(trainer, tok, completions)
    model, objective, samples = lorafit_setup(tok, adapters, completions, rewards, tmp_path,
                                              mask_truncated_completions=mask_truncated)
    [batch] = lorafit_batches(objective, model, samples, tok)
    width = theirs["prompt_ids"].shape[1]
    assert batch["input_ids"].shape[1] == width + theirs["completion_ids"].shape[1]
    prompt_real = theirs["prompt_mask"].bool()
    assert torch.equal(batch["input_ids"][:, :width][prompt_real], theirs["prompt_ids"][prompt_real])
    assert torch.equal(batch["completion_mask"][:, width:], theirs["completion_mask"])
    real = (batch["completion_mask"][:, width:] > 0) | ~torch.tensor(mask_truncated)
    comp_real = theirs["completion_mask"].bool() | real
    assert torch.equal(batch["input_ids"][:, width:][comp_real & (batch["attention_mask"][:, width:] > 0)],
                       theirs["completion_ids"][comp_real & (batch["attention_mask"][:, width:] > 0)])
    truncated = [c[-1] != EOS for rows in completions for c in rows]
    assert any(truncated)
    for i, t in enumerate(truncated):
        assert bool(batch["completion_mask"][i].sum() == 0) == (t and mask_truncated)


# -- the loss -------------------------------------------------------------------------------------------
VARIATIONS = {  # name: (TRL trainer kwargs, attribute overrides, lorafit grpo kwargs, adapter switch after sampling)
    "token": ({}, {}, {}, False),
    "sequence": ({}, {"importance_sampling_level": "sequence", "num_iterations": 2},
                 {"importance_sampling_level": "sequence", "num_iterations": 2}, True),
    "epsilon_high": ({}, {"epsilon_high": 0.28, "num_iterations": 2}, {"epsilon_high": 0.28, "num_iterations": 2}, True),
    "delta": ({}, {"delta": 1.05, "num_iterations": 2}, {"delta": 1.05, "num_iterations": 2}, True),
    "beta": ({"beta": 0.04}, {"num_iterations": 2}, {"beta": 0.04, "num_iterations": 2}, True),
    "beta_uncorrected": ({"beta": 0.04, "use_bias_correction_kl": False}, {},
                         {"beta": 0.04, "use_bias_correction_kl": False}, False),
    "temperature": ({"temperature": 0.7}, {}, {"temperature": 0.7}, False),
    "num_iterations": ({}, {"num_iterations": 2}, {"num_iterations": 2}, True),
    "accumulation": ({"gradient_accumulation_steps": 2}, {}, {}, False),
    "accumulation_iterations": ({"gradient_accumulation_steps": 2}, {"num_iterations": 2}, {"num_iterations": 2}, True),
}


@pytest.fixture(scope="module")
def trl_trainers(tok, adapters, rewards, tmp_path_factory):
    """One TRL trainer per construction the variations need (temperature, beta and accumulation are set at
    construction; the rest are attributes the loss reads), built once."""
    cache = {}

    def get(kwargs: dict):
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            batch = 8 if kwargs.get("gradient_accumulation_steps") else 16
            cache[key] = trl_trainer(tok, adapters, rewards, tmp_path_factory.mktemp("trl"), batch=batch, **kwargs)
        return cache[key]
    return get


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("variation", list(VARIATIONS))
def test_loss_gradients_and_metrics_equal_trl(loss_type, variation, trl_trainers, tok, adapters, completions, rewards,
                                               tmp_path):
    init, attrs, grpo, switch = VARIATIONS[variation]
    trainer = trl_trainers(init)
    gas = init.get("gradient_accumulation_steps", 1)
    trainer.loss_type = loss_type
    trainer.importance_sampling_level = attrs.get("importance_sampling_level", "token")
    trainer.epsilon_high = attrs.get("epsilon_high", 0.2)
    trainer.args.delta = attrs.get("delta")
    trainer.num_iterations = attrs.get("num_iterations", 1)
    set_adapter(trainer.model, adapters[0])
    theirs = trl_generation(trainer, tok, completions)
    model, objective, samples = lorafit_setup(tok, adapters, completions, rewards, tmp_path, batch=16 // gas,
                                              grad_accum=gas, reference="beta" in init, loss_type=loss_type, **grpo)
    batches = lorafit_batches(objective, model, samples, tok)
    assert len(batches) == gas
    assert ("old_logps" in batches[0]) == ("old_per_token_logps" in theirs)  # TRL's rule for computing pi_old
    if switch:  # the optimizer step between the passes: both policies move to adapter p1, pi_old stays
        set_adapter(trainer.model, adapters[1])
        set_adapter(model, adapters[1])

    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    trainer.current_gradient_accumulation_steps = gas
    trl_loss = 0.0
    for part in split_tensor_dict(theirs, gas):
        loss = trainer._compute_loss(trainer.model, part)
        loss.backward()
        trl_loss += loss.item()
    trl_metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}

    total, sums = 0.0, {}
    n_target = sum(objective.count(b) for b in batches)
    for batch in batches:  # as Trainer.accumulate does it
        loss, metrics = objective.loss(model, batch)
        (loss / n_target).backward()
        total += loss.item()
        for k, v in metrics.items():
            sums.setdefault(k, []).append(v)
    ours_loss = total / n_target
    assert close(ours_loss, trl_loss), (ours_loss, trl_loss)
    assert_grads_close(grads(model), grads(trainer.model))
    if switch:
        assert trl_metrics["clip_ratio/region_mean"] > 0  # the clipping is exercised
    for name in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl"):
        if name not in trl_metrics:
            assert name not in sums
            continue
        if gas == 1:  # TRL logs one value per micro-batch; averaged over tokens they agree only within one
            value = sum(float(v[0]) for v in sums[name]) / sum(float(v[1]) for v in sums[name])
            assert close(value, trl_metrics[name]), (name, value, trl_metrics[name])
    if gas == 1:
        assert close(max(float(v[0]) for v in sums["clip_ratio/high_max"]), trl_metrics["clip_ratio/high_max"])
        assert close(min(float(v[0]) for v in sums["clip_ratio/low_min"]), trl_metrics["clip_ratio/low_min"])
