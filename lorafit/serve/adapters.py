"""The engine's adapters: public names, the model's internal names, and who still uses them.

Adapters come and go at run time. Each load gets a fresh internal name in the model, so a name
loaded again never shares weights with requests still running on the old ones. A request holds a
reference on the internal name it was submitted with; `unload` only hides the public name from new
requests ("doomed"), and the weights leave the model once the last reference is given back
(`collect`). An adapter's files are read once: parsed, checked that it can share a batch, loaded.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from pathlib import Path

from torch import nn

import lorafit as lf
from lorafit.config import LoraConfig, check_adapter_name
from lorafit.errors import AdapterError, LorafitError
from lorafit.io import add_adapter_state, read_adapter
from lorafit.lora.state import AdapterState
from lorafit.prompt import PromptFormat
from lorafit.serve.requests import AdapterExists, BadAdapterName, UnknownAdapter
from lorafit.serve.router import Router


def check_servable(config: LoraConfig, state: AdapterState, source: str | Path) -> None:
    """Refuse adapters that cannot share a batch: per-row routing covers LoRA A/B on modules only (not
    (IA)³ vectors, not expert weights), and an
    adapter's trained biases or full module copies would change the base under every row."""
    problem = ("it is not a plain LoRA adapter ((IA)³ or AdaLoRA)" if not isinstance(config, LoraConfig) else
               "it adapts MoE expert weights (target_parameters)" if state.experts or config.target_parameters else
               "it is a DoRA adapter" if config.use_dora else
               "it trains biases (bias != 'none')" if state.biases else
               "it has modules_to_save" if state.saved or config.modules_to_save else None)
    if problem:
        raise AdapterError(f"{source}: cannot be served alongside other adapters: {problem}; "
                           "merge it into the base instead (lorafit merge)")


class AdapterRegistry:
    """Thread-safe: public name -> internal name, reference counts, deferred deletes."""

    def __init__(self, model: nn.Module, model_lock: threading.Lock, router: Router,
                 reserved: tuple[str, ...] = ("base",)) -> None:
        self.model = model
        self.model_lock = model_lock  # held while the model's adapters change (and during forwards)
        self.router = router
        self.reserved = reserved  # names that mean the base model
        self._lock = threading.Lock()  # guards the fields below
        self._internal: dict[str, str] = {}  # public name -> internal name in the model
        self._paths: dict[str, str] = {}  # public name -> folder it came from
        self._formats: dict[str, PromptFormat | None] = {}  # public name -> its recorded prompt format
        self._refs: Counter[str] = Counter()  # internal name -> requests holding it
        self._doomed: set[str] = set()  # internal names to delete once unreferenced
        self._serial = itertools.count(1)

    def load(self, name: str, path: str | Path, prompt_format: PromptFormat | None = None) -> None:
        """Load a PEFT-format adapter folder under a public `name` (LorafitError on any problem);
        `prompt_format` is the one it was trained with (None: none recorded)."""
        try:
            check_adapter_name(name)
        except LorafitError as e:
            raise BadAdapterName(str(e)) from None
        internal = f"{name[:48]}--{next(self._serial)}"  # unique: a reload never reuses running weights
        with self._lock:
            if name in self._internal or name in self.reserved:
                raise AdapterExists(f"an adapter named {name!r} is already loaded; delete it first")
        config, state = read_adapter(path)  # the one read of its files
        check_servable(config, state, path)
        with self.model_lock:
            self.router.close()
            add_adapter_state(self.model, config, state, internal, activate=False, source=str(path))
        with self._lock:
            lost = name in self._internal  # a concurrent load of the same name won
            if lost:
                self._doomed.add(internal)
            else:
                self._internal[name], self._paths[name] = internal, str(path)
                self._formats[name] = prompt_format
        if lost:
            self.collect()
            raise AdapterExists(f"an adapter named {name!r} is already loaded; delete it first")

    def unload(self, name: str) -> int:
        """Hide `name` from new requests; its weights go once the requests using it end.
        Returns how many requests still hold it."""
        with self._lock:
            if name not in self._internal:
                raise UnknownAdapter(f"no adapter named {name!r} is loaded")
            internal = self._internal.pop(name)
            self._paths.pop(name, None)
            self._formats.pop(name, None)
            self._doomed.add(internal)
            holders = self._refs[internal]
        self.collect()
        return holders

    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self._internal

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._internal)

    def prompt_format(self, name: str) -> PromptFormat | None:
        """The prompt format recorded with adapter `name` (None: none, or no such adapter)."""
        with self._lock:
            return self._formats.get(name)

    def paths(self) -> dict[str, str]:
        """Public adapter name -> the folder it was loaded from."""
        with self._lock:
            return dict(self._paths)

    def acquire(self, name: str) -> str:
        """The internal name `name` stands for now, with one more reference on it."""
        with self._lock:
            if name not in self._internal:
                raise UnknownAdapter(f"the model {name!r} does not exist")
            internal = self._internal[name]
            self._refs[internal] += 1
            return internal

    def release(self, internal: str | None) -> None:
        """Give one reference back (deleting happens in `collect`)."""
        if internal is not None:
            with self._lock:
                self._refs[internal] -= 1

    def collect(self) -> None:
        """Delete doomed adapters nobody holds any more (takes the model lock)."""
        with self._lock:
            free = [n for n in self._doomed if self._refs[n] == 0]
            self._doomed.difference_update(free)
            for n in free:
                self._refs.pop(n, None)
        if free:
            with self.model_lock:
                self.router.forget()  # their stacked copies go with them
                for n in free:
                    lf.delete_adapter(self.model, n)
