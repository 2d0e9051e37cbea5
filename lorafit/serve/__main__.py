"""`python -m lorafit.serve`: load a base model and adapters, then serve them over HTTP.

    python -m lorafit.serve --model SmolLM2-135M-Instruct --adapter sql=out/sql --adapter chat=out/chat \\
        --adapter-root out/ --api-key "$KEY" --port 8000

Once the socket is bound it prints `lorafit serve: listening on http://HOST:PORT` (with the real
port when --port is 0), which scripts and tests wait for.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from lorafit.errors import LorafitError


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The serve options; shared with `lorafit serve`."""
    parser.add_argument("--model", default=None,
                        help="HF-format folder, .gguf file, or the bundled default (SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="load an adapter folder under NAME at start (repeatable)")
    parser.add_argument("--adapter-root", default=None,
                        help="allow POST /v1/adapters to load folders under this directory (off when unset)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--api-key", default=os.environ.get("LORAFIT_API_KEY"),
                        help="require `Authorization: Bearer KEY` (default: $LORAFIT_API_KEY; none when unset)")
    parser.add_argument("--served-name", default=None, help="the base model's name in /v1/models (default: folder name)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long an idle server waits for more requests to start a batch together")
    parser.add_argument("--dtype", default="auto",
                        help="the base model's dtype: auto (bfloat16 or float16 on a GPU, float32 on the CPU), "
                             "float32, bfloat16 or float16")
    parser.add_argument("--device", default="auto",
                        help="auto (the first CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--log-level", default="warning")
    return parser


def _adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LorafitError(f"--adapter {spec!r}: expected NAME=DIR")
        out.append((name, path))
    return out


def served_name(model: str | None) -> str:
    """The base model's name in /v1/models: what the user would call it, not a cache folder."""
    from lorafit.model import DEFAULT_MODEL

    if model is None or model in (DEFAULT_MODEL, "default"):
        return DEFAULT_MODEL
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def run(args: argparse.Namespace) -> None:
    """Load, bind, print the address, serve until interrupted."""
    import torch
    import uvicorn

    from lorafit.device import resolve_device, resolve_dtype
    from lorafit.model import load_model
    from lorafit.serve.app import create_app
    from lorafit.serve.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = _adapter_specs(args.adapter)
    if args.adapter_root and not Path(args.adapter_root).is_dir():
        raise LorafitError(f"--adapter-root {args.adapter_root}: not a directory")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    name = args.served_name or served_name(args.model)
    engine = Engine(model, tokenizer, base_name=name, max_batch_size=args.max_batch_size,
                    max_wait_ms=args.max_wait_ms)
    for adapter, path in adapters:
        engine.load_adapter(adapter, path)
    app = create_app(engine, api_key=args.api_key, adapter_root=args.adapter_root)

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(512)  # connections made before uvicorn is up wait in the backlog
    host, port = sock.getsockname()[:2]
    # Idle keep-alive connections stay open 75 s (nginx's default), longer than clients keep them (httpx and
    # the OpenAI SDK: 5 s), so a client never sends a request on a connection the server is closing (uvicorn's
    # own 5 s races them: a ReadError on a busy machine).
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5,
                                           timeout_keep_alive=75))
    print(f"lorafit serve: {name} with {len(adapters)} adapter(s); listening on http://{host}:{port}", flush=True)
    server.run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m lorafit.serve", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        run(args)
    except LorafitError as e:
        print(f"lorafit serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
