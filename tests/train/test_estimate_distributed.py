"""lorafit.train.estimate.distributed: the per-device memory of DDP and FSDP on N devices."""

from __future__ import annotations

import pytest

from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.train.estimate import GIB, TrainSetup, estimate
from lorafit.train.estimate.distributed import block_weight_bytes, format_per_device, per_device
from lorafit.train.estimate.weights import base_weights


def test_ddp_is_one_device_at_its_share_of_the_batch():
    setup = TrainSetup(model="8B", method="qlora", rank=16, batch=8, seq=1024)
    ddp = per_device(setup, 4)["ddp"]
    alone = estimate(TrainSetup(model="8B", method="qlora", rank=16, batch=2, seq=1024))
    assert ddp.terms() == alone.terms()


def test_fsdp_shards_the_persistent_terms():
    setup = TrainSetup(model="70B", method="qlora", rank=16, batch=8, seq=1024)
    ddp, fsdp = per_device(setup, 8).values()
    s = setup.shape
    root = ddp.weights - s.layers * block_weight_bytes(setup)
    assert root == pytest.approx(2 * s.vocab * s.hidden * 2 + s.hidden * 2)  # embeddings + head + final norm, bf16
    assert fsdp.weights == pytest.approx(ddp.weights / 8 + root + 2 * block_weight_bytes(setup))
    assert fsdp.optimizer == pytest.approx(ddp.optimizer / 8) and fsdp.master == pytest.approx(ddp.master / 8)
    assert fsdp.activations == ddp.activations and fsdp.total < ddp.total / 2
    assert per_device(setup, 1)["ddp"].total == estimate(setup).total


def test_a_blocks_weights_are_its_share_of_the_base_in_each_format():
    """One block's weights, as `estimate.weights` counts the base: the blocks' linears in their storage
    (dtype, NF4 or ternary codes + scales) over the layers, plus the block's two RMSNorm weights."""
    for method in ("lora", "qlora", "ternary"):
        setup = TrainSetup(model="8B", method=method, group_size=64 if method == "ternary" else None)
        s, base = setup.shape, base_weights(setup)
        linears = base.codes + base.scales if method != "lora" else s.n_linear_params * 2
        assert block_weight_bytes(setup) == pytest.approx(linears / s.layers + 2 * s.hidden * 2)
    ternary = TrainSetup(model="70B", method="ternary", batch=8)
    ddp, fsdp = per_device(ternary, 8).values()
    assert fsdp.weights < ddp.weights / 2  # the packed ternary storage is sharded too


def test_the_batch_must_split_evenly():
    with pytest.raises(LorafitError, match="batch=3 cannot be split evenly over 2 devices"):
        per_device(TrainSetup(model="1B", batch=3), 2)
    with pytest.raises(LorafitError, match="nproc=0"):
        per_device(TrainSetup(model="1B", batch=2), 0)


def test_estimate_nproc_prints_both_columns(capsys):
    assert main(["estimate", "--model", "70B", "--nproc", "8", "--batch", "8", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "8 devices | micro-batch 8 (1 per device)" in out and "ddp does NOT fit, fsdp fits" in out
    assert out.splitlines()[1].split() == ["term", "ddp", "fsdp"]
    assert main(["estimate", "--model", "8B", "--method", "ternary", "--group-size", "64", "--nproc", "2",
                 "--batch", "2"]) == 0
    assert "ternary r=16 | 2 devices" in capsys.readouterr().out
    assert main(["estimate", "--nproc", "2"]) == 2
    assert "--nproc needs --model" in capsys.readouterr().err
    text = format_per_device(TrainSetup(model="1B", batch=2, device="cpu"), 2)
    assert "GiB per device" in text and "fits" not in text and f"{GIB}" not in text
