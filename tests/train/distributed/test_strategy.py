"""`distributed: auto`: DDP when a process's estimated peak fits its device, else FSDP."""

from __future__ import annotations

import torch

from lorafit.quant.linear import NF4Linear
from lorafit.quant.ternary import TernaryLinear
from lorafit.train.distributed.strategy import choose_strategy, device_memory, method_of, quantization_of
from lorafit.train.estimate import SIZES
from lorafit.train.estimate.distributed import per_device
from lorafit.train.estimate.setup import TrainSetup

CPU = torch.device("cpu")


def choose(model, requested="auto", world_size=2, **kw):
    args = {"quantize": None, "rank": 8, "batch_size": 2, "seq": 256, "device": CPU, "dtype": torch.float32,
            "checkpointing": None, **kw}
    return choose_strategy(requested, world_size, model, **args)


def test_auto_is_ddp_when_a_process_fits_and_fsdp_when_not(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    ram = device_memory(CPU, 2)
    small = per_device(TrainSetup(model="135M", rank=8, batch=2, seq=256, device="cpu"), 2)["ddp"].total
    assert small < ram  # (any machine that runs the test suite)
    strategy, why = choose("135M")
    assert strategy == "ddp" and "a DDP process needs" in why
    huge = per_device(TrainSetup(model="70B", rank=8, batch=2, seq=256, device="cpu"), 2)["ddp"].total
    if huge > ram:  # 70B in fp32 is ~260 GiB per process
        assert choose("70B")[0] == "fsdp"


def test_configured_strategies_and_unknown_models():
    assert choose(SIZES["70B"], "ddp") == ("ddp", "as configured")
    assert choose(None)[0] == "ddp"
    strategy, why = choose({"hidden_size": 8})  # not a Llama-style config: no estimate, DDP
    assert strategy == "ddp" and "no memory estimate" in why
    assert method_of(None) == "lora" and method_of("nf4") == "qlora" and method_of("ternary") == "ternary"


def test_the_estimate_is_of_the_base_the_model_holds():
    linear = torch.nn.Linear(64, 32)
    assert quantization_of(torch.nn.Sequential(linear)) is None
    assert quantization_of(torch.nn.Sequential(NF4Linear.from_linear(linear))) == "nf4"
    assert quantization_of(torch.nn.Sequential(TernaryLinear.from_linear(linear))) == "ternary"
