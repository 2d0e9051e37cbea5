"""Model cards: the README.md with YAML front matter that the Hub and `huggingface_hub.ModelCard` read.

`save_adapter` writes one next to every adapter, as PEFT, TRL and the HF Trainer do; `lorafit export`
writes one next to a .gguf. The front matter holds what the Hub indexes:

    library_name: peft            (gguf for a .gguf)
    base_model: org/name          only when the base is a Hub id, never a local path
    tags: [lora | dora | qlora, lorafit, <method>]
    pipeline_tag: text-generation

and the body lorafit's section: the hyperparameters, a results table and the framework versions,
between two HTML comments. A README already in the folder keeps its text and its own front matter
fields: only ours are set (tags are merged) and only our section is replaced.
"""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

BEGIN, END = "<!-- lorafit:begin -->", "<!-- lorafit:end -->"
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
FRONT = re.compile(r"\A---\s*\n(.*?\n)?---\s*(\n|\Z)", re.S)


def is_hub_id(name: str | None) -> bool:
    """`org/name` that is not a path on this machine (a local folder is never a card's base_model)."""
    return bool(name) and HUB_ID.fullmatch(str(name)) is not None and ".." not in str(name) \
        and not os.path.exists(str(name))


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """(front matter, body) of a README; no front matter (or unreadable YAML): ({}, the whole text)."""
    m = FRONT.match(text)
    if not m:
        return {}, text
    try:
        meta = yaml.safe_load(m.group(1) or "") or {}
    except yaml.YAMLError:
        return {}, text
    return (meta, text[m.end():]) if isinstance(meta, dict) else ({}, text)


def is_card(path: Path) -> bool:
    """The file is absent or already a model card (has front matter): ours to write or update."""
    return not path.exists() or bool(split_card(path.read_text(errors="replace"))[0])


def write_card(folder: str | Path, meta: dict[str, Any], section: str, title: str) -> Path:
    """Write or update folder/README.md: our front matter fields (`meta`; a None value removes the
    key only if we would have set it, the user's own value is kept) and our section; the rest of an
    existing README is kept. Written atomically."""
    path = Path(folder) / "README.md"
    old_meta, body = split_card(path.read_text(errors="replace")) if path.exists() else ({}, f"# {title}\n\n")
    merged = dict(old_meta)
    for key, value in meta.items():
        if key == "tags":
            merged["tags"] = list(dict.fromkeys([*value, *(old_meta.get("tags") or [])]))
        elif value is not None:
            merged[key] = value
    block = f"{BEGIN}\n{section.strip()}\n{END}"
    if BEGIN in body and END in body:
        head, _, rest = body.partition(BEGIN)
        body = head + block + rest.partition(END)[2]
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    text = "---\n" + yaml.safe_dump(merged, sort_keys=False, allow_unicode=True) + "---\n" + body.lstrip("\n")
    tmp = path.with_name(f".README.md.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def versions() -> str:
    """The framework versions line of a card."""
    parts = [f"Python {platform.python_version()}"]
    for package in ("lorafit", "torch", "transformers", "peft"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def results_table(history: list[dict[str, Any]], max_rows: int = 12) -> str:
    """Step, training loss, validation loss and the method's own metrics (keys with a '/', e.g.
    rewards/accuracies): every evaluated step, else evenly spaced steps and the last."""
    if not history:
        return "No optimizer step ran."
    rows = [h for h in history if "val_loss" in h]
    if not rows:
        stride = max(1, len(history) // (max_rows - 1))
        rows = history[::stride][: max_rows - 1]
        rows += [history[-1]] if rows[-1] is not history[-1] else []
    extra = sorted({k for h in rows for k in h if "/" in k})
    header = ["step", "train loss", "validation loss", *extra]
    return _table(header, [[str(h["step"]), _number(h.get("loss")), _number(h.get("val_loss")),
                            *(_number(h.get(k)) for k in extra)] for h in rows])


def adapter_card(peft_config: dict[str, Any], training: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """(front matter, section) of an adapter's card from its adapter_config.json fields and, when the
    trainer saved it, the run (`Trainer.run_info` plus its history)."""
    training = training or {}
    base = peft_config.get("base_model_name_or_path")
    kind = str(peft_config.get("peft_type", "LORA")).lower()
    if kind == "lora":
        kind = "dora" if peft_config.get("use_dora") else "qlora" if training.get("quantize") == "nf4" else "lora"
    method = training.get("objective") or ("sft" if training else None)
    meta = {"library_name": "peft", "base_model": base if is_hub_id(base) else None,
            "tags": [kind, "lorafit", *([method] if method else [])], "pipeline_tag": "text-generation"}
    targets = peft_config.get("target_modules")
    hyper = [("method", f"{kind}" + (f" ({method})" if method else "")),
             ("base model", f"`{base}`" if base else "–"),
             ("r", peft_config.get("r")), ("alpha", peft_config.get("lora_alpha")),
             ("dropout", peft_config.get("lora_dropout")),
             ("target modules", ", ".join(targets) if isinstance(targets, list) else targets),
             ("quantization", training.get("quantize") or ("none" if training else "–")),
             ("steps", training.get("total_steps")), ("learning rate", training.get("learning_rate")),
             ("batch size", training.get("batch_size")), ("seed", training.get("seed"))]
    section = "\n\n".join([
        "## Training with lorafit",
        "This adapter was trained with [lorafit](https://pypi.org/project/lorafit/). Load it with PEFT "
        "(`PeftModel.from_pretrained(base, folder)`) or with lorafit (`lorafit.load_adapter(model, folder)`).",
        "### Hyperparameters",
        _table(["setting", "value"], [[k, _number(v)] for k, v in hyper if v is not None]),
        "### Results",
        results_table(training.get("history") or []) if training else "Saved outside a training run.",
        "### Framework versions",
        versions()])
    return meta, section


def gguf_card(file: Path, base: str | None, what: str, outtype: str | None) -> tuple[dict[str, Any], str]:
    """(front matter, section) of the card next to a .gguf (`what`: "merged model" or "LoRA adapter")."""
    meta = {"library_name": "gguf", "base_model": base if is_hub_id(base) else None,
            "tags": ["gguf", "lorafit", *(["lora"] if "LoRA" in what else [])], "pipeline_tag": "text-generation"}
    section = "\n\n".join([
        f"## {file.name}",
        f"A {what} in GGUF, written by lorafit" + (f" ({outtype})" if outtype else "") + ", for llama.cpp "
        "and the runtimes built on it" + (f"; base: `{base}`" if base else "") + ".",
        "### Framework versions", versions()])
    return meta, section
