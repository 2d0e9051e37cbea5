"""`lorafit serve` / `python -m lorafit.serve`'s options: every mistake (a bad device or dtype, a taken
port, an adapter name given twice, a missing adapter) is one line naming it, exit status 2, found
before the model loads."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch

from lorafit.cli import main as cli_main
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


@pytest.fixture
def unloadable(tiny, tmp_path) -> Path:
    """The tiny model's folder with its weights file garbled: loading it fails, so a mistake reported
    with it was found before the model loaded."""
    folder = tmp_path / "unloadable"
    shutil.copytree(tiny[0], folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


def _one_line(capsys, status: int) -> str:
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("model", ["tiny", "unloadable"])
def test_a_busy_port_is_one_line_before_the_model_loads(tiny, unloadable, capsys, model):
    """Issue 29, bug 1: a taken port was found after the model loaded, as an OSError traceback (the
    tiny model); it is found first (the model that cannot load)."""
    folder = tiny[0] if model == "tiny" else unloadable
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        status = cli_main(["serve", "--model", str(folder), "--adapter", f"a={tiny[1]['alpha']}",
                           "--port", str(port)])
    assert _one_line(capsys, status) == (f"lorafit serve: error: --port {port}: address 127.0.0.1:{port} is already "
                                         "in use (another server?); choose another --port, or --port 0 for a free one")


def test_the_same_adapter_name_twice_is_one_line(tiny, unloadable, capsys):
    """Issue 29, bug 8: `--adapter a=X --adapter a=Y` said "2 adapter(s)" and served one."""
    alpha, beta = tiny[1]["alpha"], tiny[1]["beta"]
    status = cli_main(["serve", "--model", str(unloadable), "--adapter", f"a={alpha}", "--adapter", f"a={beta}"])
    assert _one_line(capsys, status) == (f"lorafit serve: error: --adapter 'a={beta}': the name 'a' is given twice "
                                         f"({alpha} and {beta}); give each adapter its own name: NAME=DIR")
    status = cli_main(["serve", "--model", str(unloadable), "--adapter", str(alpha), "--adapter", f"alpha={beta}"])
    assert "the name 'alpha' is given twice" in _one_line(capsys, status)  # DIR alone is named after its folder


@pytest.mark.parametrize("spec, message", [
    ("a={missing}", "{missing}: adapter folder not found"),
    ("bad.name={alpha}", "--adapter 'bad.name={alpha}': adapter name 'bad.name' must be"),
    ("=x", "--adapter '=x': expected NAME=DIR"),
])
def test_adapter_mistakes_are_found_before_the_model_loads(tiny, unloadable, tmp_path, capsys, spec, message):
    paths = {"missing": tmp_path / "missing", "alpha": tiny[1]["alpha"]}
    status = cli_main(["serve", "--model", str(unloadable), "--adapter", spec.format(**paths)])
    assert message.format(**paths) in _one_line(capsys, status)


def test_adapter_specs_name_a_folder_after_itself_or_its_run(tmp_path):
    from lorafit.serve.__main__ import adapter_specs

    run = tmp_path / "runs" / "dates"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    assert adapter_specs([str(run), f"x={run / 'adapter'}", str(tmp_path / "other")]) == [
        ("dates", str(run / "adapter")), ("x", str(run / "adapter")), ("other", str(tmp_path / "other"))]
