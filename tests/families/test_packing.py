"""The family matrix, packing side: two samples packed in one row give each sample its own logits.

A packed row carries no attention mask and position ids that restart at each sample (and no cache):
transformers then reads the restarts and isolates the samples in every attention layer (the way
`lorafit.train` packs). That holds for every family whose layers are all attention, to 1e-5 in fp32.

It does not hold where a layer carries a state along the sequence, or where the model does not look at
the restarts: each such family is measured here to leak, by far more than the tolerance, and says why.
transformers' torch reference kernels for linear attention, Mamba-2 and short convolutions take no sample
boundaries (cu_seqlens / seq_idx reach only the CUDA kernels of flash-linear-attention, causal-conv1d and
mamba-ssm), so on these families a packed run is refused and samples are padded instead.
"""

from __future__ import annotations

import pytest
import torch

from tests.families import matrix
from tests.families.kit import FAMILIES, make_model, tokenizer

TOL = 1e-5
LEAKS = {  # family -> why its packed samples see each other
    **dict.fromkeys(["qwen3_5", "qwen3_5_moe", "qwen3_next"],
                    "gated DeltaNet's recurrent state and convolution run on across samples: transformers' CPU "
                    "kernels take no sample boundaries (cu_seqlens reach flash-linear-attention's CUDA kernels only)"),
    "granitemoehybrid": "the Mamba-2 state runs on across samples: transformers' CPU scan takes no sample boundaries "
                        "(seq_idx reaches mamba-ssm's CUDA kernels only)",
    "lfm2": "the short convolution reaches into the previous sample (transformers gives it no boundaries)",
    "gpt_oss": "transformers' gpt-oss builds its masks without the position ids, so packed samples are not found",
}


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_unpacked(family, tok):
    first = tok("the quick brown fox jumps over the lazy dog")["input_ids"]
    second = tok("hello world, tokens stream back as they come")["input_ids"]
    model = make_model(family, tok)
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([first + second]), use_cache=False,
                       position_ids=torch.tensor([list(range(len(first))) + list(range(len(second)))])).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([ids]), use_cache=False).logits[0] for ids in (first, second)])
    moved = (packed - alone).abs().max().item()
    if family not in LEAKS:
        torch.testing.assert_close(packed, alone, atol=TOL, rtol=0)
        return
    assert moved > 10 * TOL, f"{family} isolates packed samples now ({moved:.1e}): allow it packing"
    matrix.refused(family, "packing", f"packed samples move each other's logits by {moved:.0e}: {LEAKS[family]}")
