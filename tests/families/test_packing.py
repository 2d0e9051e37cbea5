"""The family matrix, packing side: a packed sample computes exactly what it computes alone, or the
family refuses packing in one line.

For every family and attention implementation (eager and SDPA here, each where transformers has it for
the family; flex and flash on a GPU, marked `gpu`), with an adapter on: the logits of each sample of a
packed row equal that sample's logits unpacked, and the summed loss of packed rows equals the unpacked
batch's (fp32, 1e-5); the Trainer's probe (`check_packing`) accepts the model.

Where a layer carries a state along the sequence (gated DeltaNet in Qwen3.5 / Qwen3-Next, Mamba-2 in
Granite 4 hybrid, short convolutions in LFM2), masks cannot restart it: transformers' torch kernels for
them take no sample boundaries (cu_seqlens / seq_idx reach only the CUDA kernels of flash-linear-attention,
causal-conv1d and mamba-ssm). Those families are measured here to leak by far more than the tolerance, and
lorafit refuses `packing: true` on them in one line, before the first step (samples are padded instead).
gpt-oss builds its masks without the position ids; it packs exactly through one block mask per layer type.
"""

from __future__ import annotations

import pytest
import torch
import transformers as t

import lorafit as lf
from lorafit.errors import LorafitError
from lorafit.train.data import IGNORE, Sample, collate, pack
from lorafit.train.loss import loss_sum
from lorafit.train.packing import block_causal_mask, check_packing, model_inputs, varlen_kwargs
from lorafit.train.trainer import TrainConfig, Trainer
from tests.families import matrix
from tests.families.kit import CONFIGS, FAMILIES, RECURRENT, randomize, tokenizer

TOL = 1e-5
LENGTHS = (5, 9, 7, 3, 11, 6)  # packed into rows of 20: [5, 9], [7, 3], [11, 6]; the second row padded
ATTENTION = ("eager", "sdpa")


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def model_of(family: str, tok, attention: str, device: str = "cpu", dtype=torch.float32):
    """The kit's tiny `family` (1-D weights random too) with `attention`, a random LoRA on; None when
    transformers has no such attention path for the family (Gemma 2 and SDPA, say)."""
    config = CONFIGS[family](tok)
    config._attn_implementation = attention
    torch.manual_seed(0)
    try:
        model = t.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    except ValueError:
        return None
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    lf.apply_lora(model, lf.LoraConfig(r=4))
    randomize(model)
    return model


def samples_of(vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        out.append(Sample(ids, [IGNORE] * 2 + ids[2:], f"mem:{i}"))  # a two-token "prompt" not trained
    return out


def segments(row: Sample) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row)]
    return list(zip(starts, starts[1:]))


def packed_and_alone(model, vocab: int, device: str = "cpu", reference: str | None = None
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(packed logits, unpacked logits) of every sample of the packed rows, packed as the Trainer runs
    them; the unpacked ones under the `reference` attention implementation when given."""
    samples = samples_of(vocab)
    rows = pack(samples, 20)
    assert [len(segments(r)) for r in rows] == [2, 2, 2]
    packed = {k: v.to(device) for k, v in collate(rows, 0).items()}
    assert "attention_mask" not in packed  # the positions alone mark the samples
    pairs = []
    with torch.no_grad():
        logits = model(**model_inputs(model, packed)).logits.float()  # (3, 20, V)
        own = model.config._attn_implementation
        model.config._attn_implementation = reference or own
        for r, row in enumerate(rows):
            for a, z in segments(row):
                alone = model(input_ids=torch.tensor([row.input_ids[a:z]], device=device)).logits.float()
                pairs.append((logits[r, a:z], alone[0]))
        model.config._attn_implementation = own
    assert len(pairs) == len(samples)
    return pairs


def assert_packed_equals_unpacked(model, vocab: int, device: str = "cpu", tol: float = TOL,
                                  reference: str | None = None) -> None:
    for packed, alone in packed_and_alone(model, vocab, device, reference):
        torch.testing.assert_close(packed, alone, atol=tol, rtol=0)
    samples = samples_of(vocab)
    with torch.no_grad():
        rows = {k: v.to(device) for k, v in collate(pack(samples, 20), 0).items()}
        unpacked = {k: v.to(device) for k, v in collate(samples, 0).items()}
        packed_loss = loss_sum(model, rows)
        own = model.config._attn_implementation
        model.config._attn_implementation = reference or own
        unpacked_loss = loss_sum(model, unpacked)
        model.config._attn_implementation = own
        torch.testing.assert_close(packed_loss, unpacked_loss, atol=0, rtol=tol)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_unpacked(family, tok):
    """The matrix's packing link: exact under eager and SDPA (where the family has them), or the one-line
    refusal, measured to be needed."""
    models = {a: m for a in ATTENTION if (m := model_of(family, tok, a)) is not None}
    assert "eager" in models
    for attention, model in models.items():
        step = lambda b, model=model: loss_sum(model, b)  # noqa: E731
        if family not in RECURRENT:
            assert_packed_equals_unpacked(model, len(tok))
            check_packing(model, step, torch.device("cpu"))  # the Trainer's probe agrees
            continue
        moved = max((p - a).abs().max().item() for p, a in packed_and_alone(model, len(tok)))
        assert moved > 10 * TOL, f"{family} ({attention}) isolates packed samples now ({moved:.1e}): allow it packing"
        with pytest.raises(LorafitError, match=r"^packing: .* carry a state along the sequence.*set data.packing: "
                                               r"false$") as e:
            check_packing(model, step, torch.device("cpu"))
        assert "\n" not in str(e.value)
        if attention == "eager":
            matrix.refused(family, "packing", f"`{e.value}` (packed, its samples move each other's logits by "
                                              f"{moved:.0e})")


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "flex_attention", "flash_attention_2"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packing_on_cuda(family, attention, tok):
    if attention == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash_attention_2 needs the flash-attn package")
        dtype, tol = torch.bfloat16, 0.15  # flash attention runs in 16 bits only
    else:
        dtype, tol = torch.float32, 1e-4  # TF32-free fp32 kernels, GPU summation order
    model = model_of(family, tok, attention, device="cuda", dtype=dtype)
    if model is None:
        pytest.skip(f"transformers has no {attention} path for {family}")
    if family in RECURRENT:
        with pytest.raises(LorafitError, match="carry a state along the sequence"):
            check_packing(model, lambda b: loss_sum(model, b), torch.device("cuda"))
        return
    assert_packed_equals_unpacked(model, len(tok), device="cuda", tol=tol)
    check_packing(model, lambda b: loss_sum(model, b), torch.device("cuda"))


def test_trainer_trains_packed_rows_as_the_unpacked_samples(tok, tmp_path):
    """One Trainer step on packed rows moves the adapter exactly as on the same samples unpacked
    (same targets, same normalisation, each sample isolated)."""
    samples = samples_of(len(tok))
    adapters = []
    for name, data in (("packed", pack(samples, 20)), ("unpacked", samples)):
        model = model_of("llama", tok, "sdpa")
        config = TrainConfig(output_dir=str(tmp_path / name), lora=lf.LoraConfig(r=4), max_steps=1,
                             batch_size=len(data), learning_rate=1e-2, warmup_ratio=0)
        loss = Trainer(config, model, tok, data).train()[0]["loss"]
        adapters.append((loss, {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}))
    (loss_p, packed), (loss_u, unpacked) = adapters
    assert loss_p == pytest.approx(loss_u, rel=1e-6)
    for n in packed:
        torch.testing.assert_close(packed[n], unpacked[n], atol=1e-5, rtol=0)  # Adam steps of ~1e-2


def test_the_four_ways_of_isolating_agree():
    """positions (transformers' detection), the 4-D block masks (windowed, chunked) and flash's varlen arguments describe the
    same samples: [0 1 2 | 0 1 | pad 0 1] in one row, [0 1 2 3 4 5 6] in the next."""
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]])
    mask = block_causal_mask(positions, torch.float32)[:, 0] == 0  # (B, T, T) allowed
    assert mask[0, 4].tolist() == [False, False, False, True, True, False, False]
    assert mask[0, 6].tolist() == [False] * 5 + [True, True]
    assert mask[1].equal(torch.ones(7, 7, dtype=torch.bool).tril())
    windowed = block_causal_mask(positions, torch.float32, window=2)[:, 0] == 0
    assert windowed[1, 6].tolist() == [False] * 5 + [True, True]
    assert windowed[0, 2].tolist() == [False, True, True] + [False] * 4
    chunked = block_causal_mask(positions, torch.float32, chunk=4)[:, 0] == 0
    assert chunked[1, 5].tolist() == [False] * 4 + [True, True, False]
    v = varlen_kwargs(positions)
    assert v["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 14] and v["max_length_q"] == 7


def test_a_model_carrying_state_along_the_sequence_refuses_packing(tok, tmp_path):
    """A declared recurrent or convolutional layer type is refused before anything runs, in one line;
    so is the Trainer given packed rows for it, before its first step."""
    conv = t.Lfm2ForCausalLM(t.Lfm2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1,
                                          layer_types=["conv", "full_attention"]))
    with pytest.raises(LorafitError, match=r"packing: Lfm2ForCausalLM .* has conv layers that carry a state along "
                                           r"the sequence.*set data.packing: false") as e:
        check_packing(conv, lambda b: loss_sum(conv, b), torch.device("cpu"))
    assert "\n" not in str(e.value)
    rows = pack(samples_of(len(tok)), 20)
    with pytest.raises(LorafitError, match="packing: Lfm2ForCausalLM"):
        Trainer(TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2), conv, tok, rows)
    assert not (tmp_path / "adapter").exists()


def _attention_ignoring_the_mask(module, query, key, value, attention_mask, **kwargs):
    """An attention implementation that reads every earlier token, whatever mask it is given."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def _attention_reading_the_mask(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3", "llama4"])
def test_the_probe_catches_attention_that_ignores_the_mask_and_accepts_one_that_reads_it(family, tok):
    """An implementation registered by hand gets lorafit's block masks (what transformers' own builders make) (one tensor, windowed for Mistral;
    one per layer type for Gemma 3's sliding and Llama 4's chunked layers): one that honours them packs
    exactly, one that ignores them is caught by the probe (a leak no declared layer type announces)."""
    t.AttentionInterface.register("lorafit_test_reads_mask", _attention_reading_the_mask)
    t.AttentionInterface.register("lorafit_test_ignores_mask", _attention_ignoring_the_mask)
    good = model_of(family, tok, "lorafit_test_reads_mask")
    # transformers gives such an implementation no mask unpacked (windows are its own business): the
    # reference is the family's eager attention, alone
    assert_packed_equals_unpacked(good, len(tok), reference="eager")
    check_packing(good, lambda b: loss_sum(good, b), torch.device("cpu"))
    bad = model_of(family, tok, "lorafit_test_ignores_mask")
    with pytest.raises(LorafitError, match="a packed sample's loss changes with the sample before it") as e:
        check_packing(bad, lambda b: loss_sum(bad, b), torch.device("cpu"))
    assert "\n" not in str(e.value) and "set data.packing: false" in str(e.value)
