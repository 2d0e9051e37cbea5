"""Flag spellings: `--snake_case` is accepted for `--snake-case`, and an unknown flag gets the one it
most likely meant (`--rank` -> `--lora.r`, `--max-seq-length` -> `--data.max-seq-length`).

Pure string work on the flag lists of an argparse parser; no lorafit imports.
"""

from __future__ import annotations

import difflib

# Names other fine-tuning tools (transformers' TrainingArguments, PEFT, axolotl) use for our flags.
# A suggestion is only made when its target is a flag of the command.
ALIASES = {
    "rank": "lora.r", "lora-rank": "lora.r", "lr": "learning-rate", "steps": "max-steps",
    "num-train-epochs": "epochs", "num-epochs": "epochs", "per-device-train-batch-size": "batch-size",
    "micro-batch-size": "batch-size", "gradient-accumulation-steps": "grad-accum", "lr-scheduler-type": "schedule",
    "lr-scheduler": "schedule", "warmup": "warmup-ratio", "output": "output-dir", "out": "output-dir",
    "dataset": "data", "train-file": "data", "max-length": "data.max-seq-length", "seq-len": "data.max-seq-length",
    "sequence-len": "data.max-seq-length", "val-set-size": "data.val-fraction", "eval-file": "data.val-path",
    "base-model": "model", "model-name-or-path": "model", "load-in-4bit": "quantize", "bf16": "dtype",
    "fp16": "dtype",
}


def dashed(argv: list[str], known: list[str]) -> list[str]:
    """`argv` with `--a_b` (and `--a_b=v`) spelled `--a-b` wherever that is a known flag; a `--` ends
    the flags."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        name, eq, value = arg.partition("=")
        if name.startswith("--") and "_" in name and name.replace("_", "-") in known:
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def suggest(flag: str, known: list[str]) -> str | None:
    """The known flag `flag` most likely meant, or None. Tries, in order: dashes for underscores and
    lower case, a section prefix (`--r` -> `--lora.r`, `--lora-r` -> `--lora.r`), the names other
    tools use (ALIASES), then difflib on the full names and on the names after the section prefix."""
    key = flag.split("=")[0].lstrip("-").replace("_", "-").lower()
    names = {k.lstrip("-"): k for k in known if k.startswith("--")}
    if key in names:
        return names[key]
    in_section = [full for name, full in names.items() if name.endswith("." + key)]
    if len(in_section) == 1:
        return in_section[0]
    section, _, rest = key.partition("-")
    if rest and f"{section}.{rest}" in names:
        return names[f"{section}.{rest}"]
    alias = ALIASES.get(key) or ALIASES.get(rest)
    if alias in names:
        return names[alias]
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.7)
    if close:
        return names[close[0]]
    leaves: dict[str, list[str]] = {}
    for name, full in names.items():
        leaves.setdefault(name.rpartition(".")[2], []).append(full)
    close = difflib.get_close_matches(key.rpartition(".")[2], list(leaves), n=1, cutoff=0.7)
    if close and len(leaves[close[0]]) == 1:
        return leaves[close[0]][0]
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return names[close[0]] if close else None


def unknown_options(command: str, unknown: list[str], known: list[str]) -> str:
    """One line for the arguments `lorafit COMMAND` does not know (`unknown`), with the flag of `known`
    most likely meant as a hint."""
    flag = next((u for u in unknown if u.startswith("-")), None)
    if flag is None:
        return f"lorafit {command}: error: unexpected argument {unknown[0]!r}; see `lorafit {command} --help`"
    flag = flag.split("=")[0]
    close = suggest(flag, known)
    hint = f"; did you mean {close}?" if close else f"; see `lorafit {command} --help`"
    return f"lorafit {command}: error: unknown option {flag}{hint}"
