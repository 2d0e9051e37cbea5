"""Serve one base model with many LoRA adapters over an OpenAI-compatible HTTP API.

    python -m lorafit.serve --model M --adapter sql=out/sql --adapter-root adapters/

`Engine` (engine.py) batches requests for different adapters into the same forward pass;
`create_app` (app.py) puts the OpenAI routes in front of it. Importing this package starts
nothing; FastAPI and uvicorn are imported only by app.py and the command line.
"""

from lorafit.serve.engine import Engine, Event, Request, SamplingParams

__all__ = ["Engine", "Event", "Request", "SamplingParams"]
