"""The `lorafit` command: one function per subcommand (a function may return the exit status).

A user's mistake (a missing file, a bad field) is a `LorafitError`: printed as one line, exit
status 2, no traceback. Anything else is a bug and keeps its traceback. Warnings are one line too
(`lorafit train: warning: ...`, no Python source location). Output is pipeable: a reader that stops
early (`lorafit estimate | head -1`) ends the command quietly, with status 141 as for other tools
killed by SIGPIPE. Ctrl-C ends with status 130 (`lorafit train` writes a checkpoint first).
"""

from __future__ import annotations

import argparse
import os
import sys

from lorafit.errors import LorafitError
from lorafit.flags import dashed, unknown_options
from lorafit.model import DEFAULT_MODEL
from lorafit.terminal import Help, Parser, TrainHelp, one_line_warnings, pipeable
from lorafit.verify.args import OPTIONS
from lorafit.verify.args import add_arguments as add_verify_arguments

DEFAULT_METHOD = "qlora"  # lorafit estimate's, when --method is not given


def cmd_demo(args: argparse.Namespace) -> None:
    if args.method == "grpo":
        from lorafit.demo_grpo import GRPODemoConfig, run_grpo_demo

        cfg = GRPODemoConfig(output_dir=args.output_dir or "runs/demo-grpo", device=args.device, dtype=args.dtype,
                             quantize=None if args.quantize in (None, "none") else args.quantize)
        cfg.steps = args.steps or cfg.steps
        run_grpo_demo(cfg)
        return
    from lorafit.demo import DemoConfig, run_demo

    run_demo(DemoConfig(output_dir=args.output_dir or "runs/demo", steps=args.steps or 80, device=args.device,
                        dtype=args.dtype, quantize=None if args.quantize == "none" else args.quantize or "nf4"))


def cmd_train(args: argparse.Namespace) -> int | None:
    from lorafit.train.run import apply_override, load_yaml, parse_run_config, run

    raw = load_yaml(args.config) if args.config else {}
    for dotted, value in args.overrides:
        apply_override(raw, dotted, value)
    flags = {dotted.replace("-", "_"): value for dotted, value in args.overrides}
    config = parse_run_config(raw, args.config or "flags", flags)
    if config.train.method == "grpo":  # reward functions checked before any process starts or model loads
        from lorafit.train.run import check_grpo_rewards

        check_grpo_rewards(config)
    if args.nproc_per_node is not None and args.nproc_per_node != 1:
        from lorafit.train.distributed.launch import check_launch, launch

        check_launch(args.nproc_per_node, config.train.batch_size, config.device, config.data.path)
        argv = ["train", *([args.config] if args.config else []), *(["--resume"] if args.resume else []),
                *(["--overwrite"] if args.overwrite else [])]
        flags = [a for key, value in args.overrides for a in (f"--{key.replace('_', '-')}", value)]
        return launch(args.nproc_per_node, argv + flags)
    from lorafit.train.distributed.world import launched_size

    if launched_size() > 1:  # a torchrun process: torchrun's report names the failed rank with this error
        from torch.distributed.elastic.multiprocessing.errors import record

        run = record(run)
    run(config, resume=args.resume, overwrite=args.overwrite)
    return None


def _load(args: argparse.Namespace):
    """(model, tokenizer) of --model on --device in --dtype (both checked before anything loads), quantized
    with --quantize when the command has it."""
    from lorafit.device import resolve_device, resolve_dtype
    from lorafit.model import load_model

    device = resolve_device(args.device)
    return load_model(args.model, quantize=getattr(args, "quantize", None), dtype=resolve_dtype(args.dtype, device),
                      device=device)


def cmd_generate(args: argparse.Namespace) -> None:
    from lorafit.generate import generate_ids, render_prompt, why_empty
    from lorafit.io import adapter_dir, add_adapter_state, read_adapter, read_prompt_format
    from lorafit.prompt import TEXT, PromptFormat

    if args.max_new_tokens < 1:
        raise LorafitError(f"--max-new-tokens {args.max_new_tokens}: give a positive number of tokens")
    if args.adapter:  # read and checked before the model loads; a run's output_dir means its adapter/
        args.adapter = str(adapter_dir(args.adapter))
        adapter = read_adapter(args.adapter)
    fmt = read_prompt_format(args.adapter) if args.adapter else None  # the format the adapter was trained in
    model, tokenizer = _load(args)
    if args.adapter:
        add_adapter_state(model, *adapter, source=args.adapter)
    if args.no_chat:
        fmt = PromptFormat(TEXT)
    prompts = [render_prompt(tokenizer, p, fmt, input=args.input or "") for p in args.prompt]
    new = generate_ids(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    several = len(args.prompt) > 1
    for i, (prompt, ids) in enumerate(zip(args.prompt, new)):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if several:  # each answer under its prompt; one prompt prints the answer alone (easy to pipe)
            print(("" if i == 0 else "---\n") + f"### prompt {i + 1}: {prompt}")
        if not text:
            print(f"lorafit generate: prompt {i + 1}: {why_empty(tokenizer, ids)}", file=sys.stderr)
        elif len(ids) >= args.max_new_tokens:  # no end-of-turn / EOS token within the limit
            print(f"lorafit generate: prompt {i + 1}: cut at --max-new-tokens {args.max_new_tokens} before the "
                  "model ended its turn", file=sys.stderr)
        print(text, flush=True)
        if len(ids) >= args.max_new_tokens:
            print(f"lorafit generate: prompt {i + 1}: the answer was cut at --max-new-tokens {args.max_new_tokens} "
                  "(raise it for the rest)", file=sys.stderr)


def cmd_merge(args: argparse.Namespace) -> None:
    from lorafit.device import parse_dtype, resolve_device
    from lorafit.export.run import merge_command

    device = resolve_device(args.device)
    dtype = None if args.dtype == "auto" else parse_dtype(args.dtype)  # auto: the base's own dtype
    merge_command(args.model, args.adapter, args.out, overwrite=args.overwrite, dense=args.dense,
                  quantize=args.quantize, device=device, dtype=dtype)


def cmd_export(args: argparse.Namespace) -> None:
    from lorafit.export.run import export_command

    export_command(args.model, args.adapter, args.format, args.outtype, args.out, overwrite=args.overwrite)


def cmd_estimate(args: argparse.Namespace) -> None:
    from lorafit.train.estimate import MARKS, TrainSetup, estimate, format_grid
    from lorafit.train.estimate.shapes import model_shape

    if not args.gpu_memory > 0:
        raise LorafitError(f"--gpu-memory {args.gpu_memory:g} must be a positive size in GiB")
    method = args.method or DEFAULT_METHOD  # the table's title names it; a single estimate says it below
    setup = {"method": method, "batch": args.batch, "seq": args.seq, "device": args.device,
             "group_size": args.group_size}
    if args.nproc != 1:
        from lorafit.train.estimate.distributed import format_per_device

        if not args.model:
            raise LorafitError("--nproc needs --model: the per-device memory of one model on N devices")
        print(format_per_device(TrainSetup(model=args.model, rank=args.rank, **setup), args.nproc,
                                args.gpu_memory if args.device == "cuda" else None))
    elif args.model:
        if args.sizes:
            raise LorafitError("--sizes is for the table of sizes; drop it, or --model")
        result = estimate(TrainSetup(model=args.model, rank=args.rank, **setup))
        print(result.setup.shape.describe())  # the shape read from the folder or .gguf (or the size's)
        print(result.breakdown())
        what = f"{method}{' (the default --method)' if args.method is None else ''}, r={args.rank}, " \
               f"batch {args.batch} x seq {args.seq}"
        if args.device == "cuda":
            verdict = "fits" if result.fits(args.gpu_memory) else "does NOT fit"
            print(f"{what}: {result.total_gb:.1f} GiB: {verdict} a {args.gpu_memory:g} GiB GPU")
        else:
            print(f"{what}: {result.total_gb:.1f} GiB of RAM at the peak (the process's resident size)")
    else:
        try:  # ✓ / ✗ where the terminal can show them
            "".join(MARKS).encode(getattr(sys.stdout, "encoding", None) or "ascii")
            marks = MARKS
        except (UnicodeEncodeError, LookupError):
            marks = ("yes", "no")
        sizes = {"sizes": tuple(s.strip() for s in args.sizes.split(",") if s.strip())} if args.sizes else {}
        for size in sizes.get("sizes", ()):
            model_shape(size)  # each size checked before any row is printed
        print(format_grid(rank=args.rank, gpu_gb=args.gpu_memory, marks=marks, **setup, **sizes))


def cmd_inspect(args: argparse.Namespace) -> None:
    from lorafit.device import resolve_device
    from lorafit.inspect.run import inspect_command

    inspect_command(args.adapter, args.out, model=args.model, checkpoints=args.checkpoints, quantize=args.quantize,
                    energy=args.energy, intruder_k=args.intruder_k, modules=args.modules,
                    device=resolve_device(args.device))


def cmd_ablate(args: argparse.Namespace) -> None:
    from lorafit.ablate.run import ablate_command

    ablate_command(args.config, args.grid, args.methods, args.out, sets=args.set, max_eval=args.max_eval, tag=args.tag,
                   command="lorafit " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["ablate"] else None)


def cmd_eval(args: argparse.Namespace) -> None:
    from lorafit.evaluation.run import eval_command

    eval_command(args.data, args.adapter, model=args.model, quantize=args.quantize, device=args.device,
                 dtype=args.dtype, out=args.out, metrics=args.metric, max_new_tokens=args.max_new_tokens,
                 batch_size=args.batch_size, max_examples=args.max_examples, base=not args.no_base,
                 generate=not args.no_generate, lm_eval=args.lm_eval, include_path=args.include_path,
                 limit=args.limit)


def cmd_verify(args: argparse.Namespace) -> int:
    from lorafit.verify.run import Options, verify_command

    return verify_command(Options(**{name: getattr(args, name) for name in OPTIONS}))


def cmd_serve(args: argparse.Namespace) -> None:
    from lorafit.serve.__main__ import run

    run(args)


def add_placement(p: argparse.ArgumentParser) -> None:
    """--device and --dtype, documented by RunConfig's fields (checked when the command runs)."""
    from lorafit.fieldinfo import help_text
    from lorafit.train.run import RunConfig

    p.add_argument("--device", default="auto", metavar="DEVICE", help=help_text(RunConfig, "device"))
    p.add_argument("--dtype", default="auto", metavar="DTYPE", help=help_text(RunConfig, "dtype"))


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of RunConfig, TrainConfig, DataConfig (--data.X), LoraConfig (--lora.X) and
    PreferenceConfig (--preference.X) and GRPOConfig (--grpo.X), each with the field's docstring, type and
    default as its help."""
    from lorafit.fieldinfo import get_field, help_text, is_bool, metavar
    from lorafit.train.data import DataConfig
    from lorafit.train.run import override_flags

    groups = {"": p.add_argument_group("run and training (top-level keys of the YAML file)"),
              "data": p.add_argument_group("data (the data: section)"),
              "lora": p.add_argument_group("adapter (the lora: section)"),
              "preference": p.add_argument_group("preference losses (the preference: section; method dpo, orpo, "
                                                 "simpo, kto)"),
              "grpo": p.add_argument_group("reinforcement learning (the grpo: section; method grpo)")}
    groups["data"].add_argument("--data", dest="overrides", action="append", metavar="FILE",
                                type=lambda v: ("data.path", v),
                                help="Shorthand for --data.path. " + help_text(DataConfig, "path"))
    for key, cls, name in override_flags():
        f = get_field(cls, name)
        extra = {"nargs": "?", "const": "true"} if is_bool(f) else {}  # `--packing` alone means true
        groups[key.rpartition(".")[0]].add_argument(
            f"--{key.replace('_', '-')}", dest="overrides", action="append", metavar=metavar(f),
            type=lambda v, k=key: (k, v), help=help_text(cls, name).replace("%", "%%"), **extra)


def build_parser() -> argparse.ArgumentParser:
    from lorafit import __version__

    parser = Parser(prog="lorafit", description="LoRA fine-tuning: train, generate, merge, verify, estimate, serve.",
                    allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"lorafit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="fine-tune the bundled SmolLM2-135M on a generated task and show the effect")
    p.add_argument("--method", choices=["lora", "grpo"], default="lora",
                   help="lora: supervised QLoRA on the answers; grpo: reinforcement learning from the exact-match "
                        "reward alone (the base writes, the reward scores)")
    p.add_argument("--output-dir", default=None, help="default: runs/demo (runs/demo-grpo with --method grpo)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 80; 60 with --method grpo)")
    p.add_argument("--quantize", choices=["nf4", "ternary", "none"], default=None,
                   help="base format (default: nf4, QLoRA; none with --method grpo)")
    add_placement(p)
    p.set_defaults(func=cmd_demo)

    from lorafit.train.run import EXAMPLE

    p = sub.add_parser(
        "train", help="fine-tune a LoRA adapter (SFT, DPO, ORPO, SimPO, KTO, GRPO) from a YAML config and/or flags",
        allow_abbrev=False,
        usage="lorafit train [CONFIG.yaml] [--data FILE] [--resume | --overwrite] [--nproc-per-node N] "
              "[--FIELD VALUE ...]",
        formatter_class=TrainHelp,
        description="Every flag is a field of the YAML file too (--lora.r 8 is `lora: {r: 8}`); flags override\n"
                    "the file. Values are read as YAML: 1e-4, true, null, [q_proj, v_proj]; a bool flag alone\n"
                    "means true. A run file, commented (the list of every key follows):\n\n"
                    + "\n".join("    " + line for line in EXAMPLE.splitlines()))
    p.add_argument("config", nargs="?", help="YAML run file (the example above); flags override it")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in output_dir (written every save_steps and on Ctrl-C)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in output_dir (its adapter, checkpoints, metrics); without it, "
                        "or --resume, a folder holding a run is refused")
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="train with N processes on this machine (one per GPU; on the CPU they share the cores), "
                        "started through torchrun; several machines: run torchrun yourself (docs/guides/distributed.md)")
    add_train_flags(p)
    p.set_defaults(func=cmd_train, overrides=[])

    p = sub.add_parser("generate", help="generate text with a model, optionally with an adapter", formatter_class=Help)
    p.add_argument("prompt", nargs="+", help="one or more prompts (several: each answer printed under its prompt)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder, .gguf file or the default name")
    p.add_argument("--adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors), or a "
                   "lorafit train output_dir (its adapter/)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (a cut answer is said so)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--input", help="an Alpaca record's input, placed after each prompt (the instruction) as "
                   "training placed it")
    p.add_argument("--no-chat", action="store_true",
                   help="send the prompt as raw text (BOS only), without the chat template or instruction format")
    p.add_argument("--quantize", choices=["nf4", "ternary"],
                   help="load the base quantized, as in QLoRA training (an NF4-trained adapter on its NF4 base)")
    add_placement(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="merge an adapter into its base and save a plain transformers checkpoint",
                       formatter_class=Help)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base the adapter was trained on: HF folder, .gguf "
                   "file or the default name")
    p.add_argument("--adapter", required=True, help="adapter folder, or a lorafit train output_dir (its adapter/)")
    p.add_argument("--out", required=True, help="folder to write the merged model and tokenizer to")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists and is not empty")
    p.add_argument("--dense", action="store_true",
                   help="quantized base: write exact merged 16-bit weights instead of requantizing")
    p.add_argument("--quantize", help="nf4: merge into the base quantized as in QLoRA training (drift report)")
    p.add_argument("--device", default="auto", metavar="DEVICE", help="where the merge runs: auto (the first GPU, "
                   "else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", metavar="DTYPE", help="dtype of the merged weights: auto (the base's "
                   "own, as its config.json records it; bfloat16 for --dense), float32, bfloat16 or float16")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write the merged model (or the adapter alone) as GGUF for llama.cpp",
                       formatter_class=Help)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base: HF folder, .gguf file or the default name")
    p.add_argument("--adapter", help="adapter folder (or a lorafit train output_dir) to merge in (gguf) or to convert "
                   "(gguf-lora); none: the base")
    p.add_argument("--format", default="gguf", help="gguf (one merged model file) or gguf-lora (the adapter alone)")
    p.add_argument("--outtype", help="gguf: f32, f16 (default), bf16, q8_0, q4_0; gguf-lora: f32 (default), f16, bf16")
    p.add_argument("--out", required=True, help="the .gguf file to write (its folder must exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    p.set_defaults(func=cmd_export)

    from lorafit.train.estimate import DEVICES, METHODS

    p = sub.add_parser("estimate", help="memory needed for full fine-tuning, LoRA, QLoRA or a ternary base",
                       formatter_class=Help, description="Sizes are GiB (2^30 bytes).")
    p.add_argument("--model", help="a size (1B, 7B, 40B, 350M, ...: a size that is no known model's gets a Llama "
                   "shape interpolated from the known ones), a model folder or a .gguf (its real shape is read); "
                   "omit for the table of sizes")
    p.add_argument("--sizes", metavar="S1,S2,...", help="the table's sizes, comma-separated (any number with M or B; "
                   "default 1B,3B,7B,8B,13B,34B,65B,70B)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help=f"full, lora (16-bit base), qlora (NF4 base), ternary (packed ternary base); "
                        f"default: {DEFAULT_METHOD} (on the CPU too: lorafit trains QLoRA there)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (the table's total column)")
    p.add_argument("--batch", type=int, default=1, help="samples per micro-batch")
    p.add_argument("--seq", type=int, default=512, help="tokens per sample")
    p.add_argument("--gpu-memory", type=float, default=16.0, help="the card's memory in GiB, for 'fits?'")
    p.add_argument("--device", choices=DEVICES, default="cuda",
                   help="cuda: GPU memory of a bf16 run with gradient checkpointing; cpu: peak RSS of an fp32 run")
    p.add_argument("--group-size", type=int, help="ternary: columns per fp32 scale (default: one scale per row)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="per-device memory of DDP and of FSDP on N devices (--batch is then the micro-batch of all)")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("inspect", help="what an adapter changed: norms, spectra, ranks, intruders; report + PNGs",
                       formatter_class=Help)
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors), or a lorafit "
                   "train output_dir (its adapter/)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base it was trained on: HF folder, .gguf or the default")
    p.add_argument("--out", required=True, help="folder for report.md, inspect.json and the PNGs")
    p.add_argument("--checkpoints", metavar="RUN_DIR",
                   help="a lorafit train output_dir: also draw ‖BA‖_F per layer over its checkpoints' steps")
    p.add_argument("--quantize", help="nf4 or ternary: analyse the dequantized base the adapter was trained on")
    p.add_argument("--energy", type=float, default=0.9, help="share of each update's energy the suggested ranks keep")
    p.add_argument("--intruder-k", type=int, default=10, help="top singular vectors tested for intruders (0: skip)")
    p.add_argument("--modules", help="regex: analyse only the adapted modules whose path it finds")
    p.add_argument("--device", default="cpu", help="where the model loads (the analysis runs on the CPU)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("ablate", help="train a grid of settings and methods; tables and plots of quality, memory, time")
    p.add_argument("config", help="a lorafit train YAML file: the data, model, step budget and seed every point shares")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one axis: a config key and its values, e.g. lora.r=1,4,8 or lora.target_modules=q|qkv|all "
                        "(short target names q, qk, qkv, qkvo, mlp, all); repeat for more axes")
    p.add_argument("--methods", default="lora", help="comma-separated: lora, qlora (NF4 base), dora, full")
    p.add_argument("--out", required=True, help="folder for points/, results.md, results.json and the PNGs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every point (max_steps=40), or for one method's (full:learning_rate=1e-4)")
    p.add_argument("--max-eval", type=int, help="evaluate on at most this many held-out samples")
    p.add_argument("--tag", help="prefix of the result files, so several ablations can share --out and its points")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("eval", help="score the base and adapters side by side on held-out data (loss, perplexity, "
                       "answers); lm-evaluation-harness tasks", formatter_class=Help)
    p.add_argument("--data", required=True, help="held-out JSONL in a training format (alpaca, chat or text records)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="an adapter to score; repeat for more (all share the loaded base and every batch)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base: HF folder (a merged one too), .gguf or the default")
    p.add_argument("--quantize", help="nf4 or ternary: the base as QLoRA / ternary training saw it")
    p.add_argument("--out", default="runs/eval", help="folder for results.md, results.json and wrong/<model>.jsonl")
    p.add_argument("--metric", action="append", metavar="NAME",
                   help="exact (default), contains, regex (the reference is a pattern), or a Python scorer "
                        "module:function (prediction, reference, record) -> bool or [0, 1]; repeat for several")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest generated answer in tokens")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward, over all models")
    p.add_argument("--max-examples", type=int, help="score the first N records only")
    p.add_argument("--no-base", action="store_true", help="score the adapters only")
    p.add_argument("--no-generate", action="store_true", help="loss and perplexity only (no answers)")
    p.add_argument("--lm-eval", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated (the shipped "
                   "lorafit_dates, lorafit_dates_mc, lorafit_text; or your own with --include-path)")
    p.add_argument("--include-path", action="append", metavar="DIR", help="a folder of lm-eval task YAMLs")
    p.add_argument("--limit", type=int, help="lm-eval: at most N documents per task")
    add_placement(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("verify", help="prove an adapter is what users will run: fingerprint vs adapter, PEFT, merges, "
                       "GGUF, a server; engine checks; an Ollama Modelfile")
    add_verify_arguments(p)
    p.set_defaults(func=cmd_verify)

    from lorafit.serve.__main__ import add_arguments as add_serve_arguments

    p = sub.add_parser("serve", help="serve one base model with many adapters over an OpenAI-compatible HTTP API",
                       formatter_class=Help)
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _flags(sub: argparse.ArgumentParser) -> list[str]:
    return [o for a in sub._actions for o in a.option_strings]


def main(argv: list[str] | None = None) -> int:
    return pipeable(lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    subcommands = _subcommands(parser)
    command = next((a for a in argv if a in subcommands), None)
    if command is not None:
        argv = dashed(argv, _flags(subcommands[command]))  # --learning_rate works as --learning-rate
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(unknown_options(args.command, unknown, _flags(subcommands[args.command])), file=sys.stderr)
        return 2
    one_line_warnings(args.command)
    try:
        status = args.func(args)
    except LorafitError as e:
        rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else None
        print(f"lorafit {args.command}: error: {e}" + (f" (rank {rank})" if rank else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorafit {args.command}: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
