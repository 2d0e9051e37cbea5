"""`python -m lorafit.serve`: load a base model and adapters, then serve them over HTTP.

    python -m lorafit.serve --model SmolLM2-135M-Instruct --adapter sql=out/sql --adapter chat=out/chat \\
        --adapter-root out/ --api-key "$KEY" --port 8000

Everything a user can get wrong is checked before the model loads (minutes for a large one): the
adapter specs (`NAME=DIR`, or `DIR` alone: named after its folder; a name given twice), each adapter's
files, and the port (bound first, listened on once the model is ready). When the server is ready it
prints `lorafit serve: listening on http://HOST:PORT` (with the real port when --port is 0), which
scripts and tests wait for. With --log-level info each request gets one line: method, path, adapter,
status, tokens (prompt + completion) and milliseconds.
"""

from __future__ import annotations

import argparse
import errno
import logging
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
                        help="load an adapter folder (or a lorafit train output_dir) under NAME at start; DIR alone: "
                             "named after its folder (repeatable)")
    parser.add_argument("--adapter-root", default=None,
                        help="allow POST /v1/adapters to load folders under this directory (off when unset)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--api-key", default=os.environ.get("LORAFIT_API_KEY"),
                        help="require `Authorization: Bearer KEY` (default: $LORAFIT_API_KEY; none when unset)")
    parser.add_argument("--served-name", default=None, help="the base model's name in /v1/models (default: folder name)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="most requests decoded together")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long an idle server waits for more requests to start a batch together")
    parser.add_argument("--quantize", choices=["nf4", "ternary"], default=None,
                        help="quantize the base while loading, as in QLoRA training (serve an adapter on the base "
                             "it was trained on: an NF4-trained adapter on the NF4 base)")
    parser.add_argument("--dtype", default="auto",
                        help="the base model's dtype: auto (bfloat16 or float16 on a GPU, float32 on the CPU), "
                             "float32, bfloat16 or float16")
    parser.add_argument("--device", default="auto",
                        help="auto (the first CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                        help="info: also one line per request (method, path, adapter, status, tokens, ms)")
    return parser


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """(name, folder) of each --adapter: NAME=DIR, or DIR alone (named after its folder, or its run's
    folder for a run's adapter/); a name given twice is refused."""
    from lorafit.config import check_adapter_name
    from lorafit.io import adapter_dir, adapter_name

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep and spec:
            name, path = adapter_name(spec), spec
        if not name or not path:
            raise LorafitError(f"--adapter {spec!r}: expected NAME=DIR (or DIR, named after its folder)")
        try:
            check_adapter_name(name)
        except LorafitError as e:
            raise LorafitError(f"--adapter {spec!r}: {e}; give it a name: NAME=DIR") from None
        if name in out:
            raise LorafitError(f"--adapter {spec!r}: the name {name!r} is given twice ({out[name]} and {path}); "
                               "give each adapter its own name: NAME=DIR")
        out[name] = str(adapter_dir(path))
    return list(out.items())


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (listening starts when the server is ready), or a LorafitError
    naming the port when it is taken or not ours to bind."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LorafitError(f"--port {port}: address {host}:{port} is already in use (another server?); "
                               "choose another --port, or --port 0 for a free one") from None
        if e.errno == errno.EACCES:
            raise LorafitError(f"--port {port}: not allowed to bind {host}:{port} (ports below 1024 need root); "
                               "choose another --port") from None
        raise LorafitError(f"--host {host} --port {port}: cannot bind ({e.strerror or e})") from None
    return sock


def served_name(model: str | None) -> str:
    """The base model's name in /v1/models: what the user would call it, not a cache folder."""
    from lorafit.model import DEFAULT_MODEL

    if model is None or model in (DEFAULT_MODEL, "default"):
        return DEFAULT_MODEL
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def run(args: argparse.Namespace) -> None:
    """Check the arguments and the adapters, bind, load, print the address, serve until interrupted."""
    import torch
    import uvicorn

    from lorafit.device import resolve_device, resolve_dtype
    from lorafit.io import read_adapter
    from lorafit.model import load_model
    from lorafit.serve.adapters import check_servable
    from lorafit.serve.app import create_app
    from lorafit.serve.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = adapter_specs(args.adapter)
    if args.adapter_root and not Path(args.adapter_root).is_dir():
        raise LorafitError(f"--adapter-root {args.adapter_root}: not a directory")
    for _, path in adapters:  # each adapter's files, before the slow part
        check_servable(*read_adapter(path), path)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    sock = bind(args.host, args.port)  # a taken port is found now, not after loading the model
    try:
        model, tokenizer = load_model(args.model, quantize=args.quantize, dtype=dtype, device=device)
        name = args.served_name or served_name(args.model)
        engine = Engine(model, tokenizer, base_name=name, max_batch_size=args.max_batch_size,
                        max_wait_ms=args.max_wait_ms)
        for adapter, path in adapters:
            engine.load_adapter(adapter, path)
        app = create_app(engine, api_key=args.api_key, adapter_root=args.adapter_root)
        sock.listen(512)  # connections made before uvicorn is up wait in the backlog
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    if args.log_level in ("info", "debug", "trace"):
        _log_requests(args.log_level)
    # Idle keep-alive connections stay open 75 s (nginx's default), longer than clients keep them (httpx and
    # the OpenAI SDK: 5 s), so a client never sends a request on a connection the server is closing (uvicorn's
    # own 5 s races them: a ReadError on a busy machine).
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5,
                                           timeout_keep_alive=75, access_log=False))  # our request line replaces uvicorn's
    print(f"lorafit serve: {name} with {len(adapters)} adapter(s); listening on http://{host}:{port}", flush=True)
    server.run(sockets=[sock])


def _log_requests(level: str) -> None:
    """The "lorafit.serve" logger's request lines on stderr, in uvicorn's style."""
    logger = logging.getLogger("lorafit.serve")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if level in ("debug", "trace") else logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m lorafit.serve", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        run(args)
    except LorafitError as e:
        print(f"lorafit serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
