"""`python -m lorafit.serve`'s options: a bad device or dtype is one line naming it, exit status 2."""

from __future__ import annotations

import pytest
import torch

from lorafit.serve.__main__ import add_arguments, main


def test_device_and_dtype_default_to_auto():
    import argparse

    args = add_arguments(argparse.ArgumentParser()).parse_args([])
    assert (args.device, args.dtype) == ("auto", "auto")


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--dtype", "float64", "dtype 'float64' is unknown"),
    ("--device", "tpu9", "device 'tpu9' is not a device name"),
    *([("--device", "cuda", "no CUDA GPU")] if not torch.cuda.is_available() else []),
])
def test_a_bad_device_or_dtype_is_one_line(tiny, capsys, flag, value, message):
    assert main(["--model", str(tiny[0]), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
