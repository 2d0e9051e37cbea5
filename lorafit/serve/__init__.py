"""Serve one base model with many LoRA adapters over an OpenAI-compatible HTTP API.

    python -m lorafit.serve --model M --adapter sql=out/sql --adapter-root adapters/

`Engine` (engine.py) batches requests for different adapters into the same forward pass;
`create_app` (app.py) puts the OpenAI routes in front of it; `Request`, `SamplingParams` and
`Event` (requests.py) are what a request is, what it asks for and what it gets back. Importing this package imports
nothing heavy (the command line's argument parser stays fast); the names below load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorafit.serve.app import create_app
    from lorafit.serve.engine import Engine
    from lorafit.serve.requests import Event, Request, SamplingParams

__all__ = ["Engine", "Event", "Request", "SamplingParams", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from lorafit.serve import app

        return app.create_app
    if name == "Engine":
        from lorafit.serve import engine

        return engine.Engine
    if name in __all__:
        from lorafit.serve import requests

        return getattr(requests, name)
    raise AttributeError(f"module 'lorafit.serve' has no attribute {name!r}")
