"""`lorafit verify ADAPTER`: is the adapter what users will run? One table, a verdict per path, exit 1 if not.

    reference         the fingerprint saved with the adapter (lorafit.fingerprint): what the trained model
                      predicted on a few fixed probes. With --data, or for an adapter without one, the
                      adapter on its base, computed here, on the data's first samples.
    adapter           the folder loaded on its base (as trained: NF4 when it trained on NF4)
    PEFT              PeftModel.from_pretrained on the same base (bitsandbytes 4-bit for NF4)
    merged            the exact merge (dense fp32 weights)
    merged -> NF4     the merge requantized to NF4 (lorafit merge --quantize nf4): its drift, and per layer
                      the share of the update that survives (lorafit.merge)
    GGUF              --gguf: the merged model exported as f32 GGUF (or --gguf FILE) run by llama.cpp
    server            --serve URL: a running lorafit serve (or vLLM) answering with log-probs

--quick computes the adapter on its base alone (and --serve / --gguf FILE): the fast check that a file
is the one that was trained, on the base it was trained on.

Each path is compared with the reference (lorafit.verify.compare) within its kind's tolerance. --target
checks what vLLM, SGLang, llama.cpp or Ollama accept (lorafit.verify.targets); for Ollama it also writes
a Modelfile with a GGUF LoRA (lorafit.verify.modelfile). Exit status: 0 all good, 1 a path beyond its
tolerance or a failed target check, 2 a user mistake.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.fingerprint import Fingerprint, Probe, choose_probes, probe_logprobs, read_fingerprint, top_k
from lorafit.io import CONFIG_NAME, read_adapter, read_prompt_format
from lorafit.merge import MergeError
from lorafit.model import DEFAULT_MODEL, default_gguf, resolve_model
from lorafit.verify import local
from lorafit.verify.compare import CLOSE, EXACT, LOSSY, Distance, Tolerance, distance_full, distance_top
from lorafit.verify.external import LLAMA_CPP_MISSING, gguf_logprobs, llama_cpp_available, server_top
from lorafit.verify.targets import check_target


@dataclass
class Row:
    path: str
    verdict: str  # "pass", "FAIL", "skipped", "reference"
    distance: Distance | None = None
    tolerance: str = ""
    note: str = ""


@dataclass
class Options:
    adapter: str
    model: str | None = None
    quantize: str | None = "auto"  # "auto": as the fingerprint says; "none" / "nf4" / "ternary"
    data: str | None = None
    gguf: str | None = None  # None: no GGUF row; "": export one; else a file
    serve: str | None = None
    serve_model: str | None = None
    api_key: str | None = None
    target: str | None = None
    max_lora_rank: int | None = None
    out: str | None = None
    report: str | None = None
    quick: bool = False  # the adapter on its base only (and --serve)
    device: str = "cpu"
    dtype: str = "float32"


def verify_command(opts: Options) -> int:
    """Run every check of `opts` (module docstring), print the table; returns the exit status."""
    from transformers import AutoConfig

    from lorafit.device import resolve_device, resolve_dtype

    folder = Path(opts.adapter)
    config, state = read_adapter(folder)  # a broken folder is a one-line error before anything loads
    peft = json.loads((folder / CONFIG_NAME).read_text())
    fmt = read_prompt_format(folder)
    fingerprint = read_fingerprint(folder)
    quantize = _quantize(opts.quantize, fingerprint)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    base_config = AutoConfig.from_pretrained(resolve_model(opts.model))
    failures = []
    if opts.target:
        failures = [f"--target {opts.target}: {line}" for line in
                    check_target(opts.target, folder, peft, config, state, base_config, opts.max_lora_rank)]
        if opts.target == "ollama" and not failures:
            failures += _write_ollama(opts, folder, config, state, base_config, fmt)

    rows, survival = [], []
    if fingerprint is None and opts.data is None:
        if not opts.target:
            raise LorafitError(f"{folder}: has no fingerprint (lorafit_fingerprint.json; adapters trained by lorafit "
                               "write one): give --data FILE to compare on your own samples")
        print(f"{folder}: no fingerprint, and no --data to compare on: only --target {opts.target} is checked")
    else:
        rows, survival = _compare(opts, folder, fingerprint, fmt, quantize, device, dtype)
        print(format_table(rows))
    if survival:
        print(format_survival(survival))
    for line in failures:
        print(line)
    if opts.report:
        Path(opts.report).write_text(json.dumps({
            "rows": [asdict(r) for r in rows], "survival": [asdict(e) for e in survival],
            "target_failures": failures}, indent=2) + "\n")
    bad = [r.path for r in rows if r.verdict == "FAIL"]
    if bad:
        print(f"lorafit verify: {', '.join(bad)} beyond tolerance of the reference")
    return 1 if bad or failures else 0


def _quantize(option: str | None, fingerprint: Fingerprint | None) -> str | None:
    if option in (None, "auto"):
        return (fingerprint.meta.get("quantize") if fingerprint else None) or None
    if option == "none":
        return None
    if option not in ("nf4", "ternary"):
        raise LorafitError(f"--quantize {option}: use auto, none, nf4 or ternary")
    return option


def _probes(opts: Options, folder: Path, fingerprint: Fingerprint | None, fmt, tokenizer) -> list[Probe]:
    """The probes: the fingerprint's, or --data's first samples rendered as the adapter was trained."""
    if opts.data is None:
        return fingerprint.probes
    from lorafit.train.data import read_records, tokenize_record

    records = read_records(opts.data)
    samples = [tokenize_record(tokenizer, r, fmt=fmt) for r in records[:32]]
    probes = choose_probes((s.input_ids, s.labels) for s in samples)
    if not probes:
        raise LorafitError(f"{opts.data}: no sample has a reply to compare on")
    return probes


def _compare(opts: Options, folder: Path, fingerprint: Fingerprint | None, fmt, quantize: str | None, device,
             dtype) -> tuple[list[Row], list[MergeError]]:
    tokenizer = _tokenizer(opts.model)
    probes = _probes(opts, folder, fingerprint, fmt, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if opts.quick:
        on_base, merged, merged_model = probe_logprobs(local.load_adapted(opts.model, folder, quantize, device, dtype)[0],
                                                       probes, pad), "--quick", None
    else:
        on_base, merged, merged_model = local.adapter_and_merge(opts.model, folder, quantize, probes, pad, device,
                                                                dtype)
    own = fingerprint is not None and opts.data is None
    reference = fingerprint.top if own else top_k(on_base)
    fp32 = dtype == torch.float32 and (not own or fingerprint.meta.get("dtype", "float32") == "float32")
    exact = EXACT if fp32 else CLOSE
    rows = [Row("reference", "reference", note=_describe_reference(fingerprint, own, probes))]

    def add(path: str, result, tol: Tolerance, note: str = "") -> None:
        if isinstance(result, str):
            rows.append(Row(path, "skipped", note=result))
            return
        d = distance_full(reference, result) if isinstance(result[0], torch.Tensor) else distance_top(reference, result)
        rows.append(Row(path, "pass" if d.within(tol) else "FAIL", d, tol.label,
                        "; ".join([*([note] if note else []), *d.beyond(tol)])))

    add("adapter on its base", on_base, exact, "" if own else "the reference itself")
    add("PEFT", "--quick" if opts.quick else local.peft_logprobs(opts.model, folder, quantize, probes, pad), exact)
    add("merged (fp32)", merged, exact)
    survival: list[MergeError] = []
    if opts.quick:
        rows.append(Row("merged -> NF4", "skipped", note="--quick"))
    elif quantize == "nf4":
        requant, survival = local.requantized(opts.model, folder, probes, pad, device, dtype)
        low = min(survival, key=lambda e: e.survival) if survival else None
        add("merged -> NF4", requant, LOSSY, f"update surviving: mean {100 * _mean(survival):.1f}%, lowest "
            f"{100 * low.survival:.1f}% ({low.layer})" if low else "")
    else:
        rows.append(Row("merged -> NF4", "skipped", note="the base is not NF4"))
    add("GGUF (llama.cpp)", *_gguf(opts, merged_model, tokenizer, probes))
    del merged_model
    if opts.serve:
        name = opts.serve_model or folder.resolve().name
        top = server_top(opts.serve, name, probes, max(len(t[0]) for t in reference) * 2, opts.api_key)
        add(f"server {opts.serve} ({name})", top, exact)
    else:
        rows.append(Row("server", "skipped", note="--serve URL"))
    return rows, survival


def _tokenizer(model: str | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _gguf(opts: Options, merged_model, tokenizer, probes: list[Probe]):
    """(log-probs or why skipped, tolerance, note) of the GGUF row."""
    if opts.gguf is None:
        return "--gguf (export the merged model and run it in llama.cpp)", EXACT
    if merged_model is None and not opts.gguf:
        return "--quick: no merged model to export (give --gguf FILE)", EXACT
    if not llama_cpp_available():
        return LLAMA_CPP_MISSING, EXACT
    from lorafit.gguf_read import gguf_metadata

    with tempfile.TemporaryDirectory(prefix="lorafit-verify-") as tmp:
        path = Path(opts.gguf) if opts.gguf else None
        if path is None:
            from lorafit.export.model_gguf import export_gguf

            path = export_gguf(merged_model, tokenizer, Path(tmp) / "merged-f32.gguf", "f32").path
        elif not path.is_file():
            raise LorafitError(f"--gguf {path}: no such file")
        kind = gguf_metadata(path).get("general.file_type", 0)
        tol = EXACT if kind == 0 else CLOSE if kind in (1, 32) else LOSSY  # f32; f16, bf16; quantized
        return gguf_logprobs(path, probes), tol, f"{path.name}, f32 KV cache"


def _mean(errors: list[MergeError]) -> float:
    return sum(e.survival for e in errors) / max(len(errors), 1)


def _describe_reference(fingerprint: Fingerprint | None, own: bool, probes: list[Probe]) -> str:
    n = sum(len(p.positions) for p in probes)
    if not own:
        return f"the adapter on its base, {n} positions of {len(probes)} samples"
    m = fingerprint.meta
    return (f"fingerprint: {n} positions of {len(probes)} {m.get('source', '')} samples, top-{m.get('top_k')}, "
            f"step {m.get('step')}, {m.get('quantize') or 'dense'} base, {m.get('dtype')} on {m.get('device')}")


def _write_ollama(opts: Options, folder: Path, config, state, base_config, fmt) -> list[str]:
    """The Ollama Modelfile and the adapter's GGUF LoRA in --out (default: <adapter>/ollama); failures as lines."""
    from transformers import AutoTokenizer

    from lorafit.export.lora_gguf import export_gguf_lora
    from lorafit.paths import write_folder
    from lorafit.prompt import default_format
    from lorafit.verify.modelfile import modelfile, template_and_stops

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(opts.model))
    try:
        template, stops = template_and_stops(tokenizer, fmt or default_format(tokenizer))
    except LorafitError as e:
        return [f"--target ollama: {e}"]
    if opts.model is None or opts.model in (DEFAULT_MODEL, "default"):
        base = str(default_gguf())
    else:
        base = str(Path(opts.model).resolve())
    out = Path(opts.out) if opts.out else folder / "ollama"
    note = (f"Written by lorafit verify --target ollama for {folder.resolve()}.\n"
            f"Create and run it: ollama create {re.sub(r'[^a-z0-9._-]', '-', folder.resolve().name.lower())} -f "
            f"{out.resolve() / 'Modelfile'}")

    def write(tmp: Path) -> None:
        export_gguf_lora(config, state, base_config, tmp / "adapter.gguf", "f32", source=str(folder),
                         name=folder.resolve().name)
        (tmp / "Modelfile").write_text(modelfile(base, "./adapter.gguf", template, stops, note))
    write_folder(out, write)
    print(f"wrote {out / 'Modelfile'} and {out / 'adapter.gguf'} (FROM {base})")
    return []


def format_table(rows: list[Row]) -> str:
    head = f"{'path':<34} {'max |Δ logprob|':>15} {'mean KL':>9} {'greedy':>7}  {'verdict':<9} note"
    lines = [head, "-" * len(head)]
    for r in rows:
        d = r.distance
        nums = (f"{d.max_dlogp:>15.2e} {d.mean_kl:>9.1e} {100 * d.agreement:>6.0f}%" if d is not None
                else f"{'':>15} {'':>9} {'':>7}")
        verdict = f"{r.verdict} ({r.tolerance})" if r.tolerance else r.verdict
        lines.append(f"{r.path:<34} {nums}  {verdict:<9} {r.note}".rstrip())
    return "\n".join(lines)


def format_survival(errors: list[MergeError]) -> str:
    """Per decoder layer, the share of each adapted module's update that survives requantizing to NF4."""
    blocks: dict[str, list[str]] = {}
    for e in errors:
        m = re.match(r"(.*?\.\d+)\.(.*)", e.layer)
        block, module = (m.group(1), m.group(2).split(".")[-1]) if m else ("", e.layer)
        blocks.setdefault(block, []).append(f"{module} {100 * e.survival:.0f}%")
    lines = [f"merged -> NF4: share of each trained update that survives requantization (mean "
             f"{100 * _mean(errors):.1f}%, drift of layer outputs: mean {100 * sum(e.rel for e in errors) / len(errors):.2f}%)"]
    lines += [f"  {block or '(top)'}: {', '.join(mods)}" for block, mods in blocks.items()]
    return "\n".join(lines)
