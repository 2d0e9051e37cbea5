"""Session fixtures of the export tests: one demo-style adapter trained on SmolLM2, the merged model,
and its GGUF exports (made once, shared by the parity, chat and round-trip tests)."""

from __future__ import annotations

import pytest
import torch

from tests.export.kit import train_demo_adapter


@pytest.fixture(scope="session")
def demo_adapter(smollm2_dir, tmp_path_factory):
    """(adapter folder, held-out records) of a short QLoRA run of the demo's recipe."""
    return train_demo_adapter(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def smollm2_merged(demo_adapter):
    """(SmolLM2 + the demo adapter merged exactly in fp32, its tokenizer)."""
    from lorafit.io import load_adapter
    from lorafit.merge import merge_to_dense
    from lorafit.model import load_model

    model, tokenizer = load_model(None)
    load_adapter(model, demo_adapter[0])
    return merge_to_dense(model, torch.float32).eval(), tokenizer


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_merged, tmp_path_factory):
    """outtype -> path of the merged SmolLM2 exported at that outtype (each written once)."""
    from lorafit.export import export_gguf

    folder, made = tmp_path_factory.mktemp("smollm2-gguf"), {}

    def get(outtype: str):
        if outtype not in made:
            made[outtype] = export_gguf(*smollm2_merged, folder / f"smollm2-demo-{outtype}.gguf", outtype).path
        return made[outtype]

    return get
