"""The batch scheduler: one base model, many LoRA adapters, each request on its own adapter.

A single scheduler thread owns every forward pass. Requests wait in a queue; each loop turn
decodes one token for every running row and then admits waiting requests (prefilling them in one
forward and splicing their KV cache into the running batch), so a new request never waits for a
long one to finish (continuous batching). Rows with different adapters share every forward
through `lorafit.adapter_per_row`, so eight adapters cost one base matmul per layer, not eight
(plus two batched low-rank matmuls, `lorafit.ops.multi_lora`). Requests admitted together on
one adapter whose prompts start alike (a chat template's system prompt) prefill that prefix
once. The KV cache (`kvcache.AppendCache`) appends each step's column in place.

Adapters come and go at run time. A request holds a reference on the adapter it was submitted
with, so `unload_adapter` only hides the name from new requests; the weights leave the model
when the last request using them ends. A reloaded name gets fresh internal weights, so running
requests keep the weights they started with. `model_lock` guards the model: load, delete and
forward never overlap.

Rows are left-padded and right-aligned: every row's real tokens end at the last KV column,
so merging two batches is a left pad of the shorter cache, and per-row position ids keep each
row's rotary positions independent of the padding (a shared-prefix prefill also leaves masked
padding between a row's prefix and the rest of its prompt).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import lorafit as lf
from lorafit.errors import AdapterError, LorafitError
from lorafit.io import read_adapter
from lorafit.serve.kvcache import AppendCache

log = logging.getLogger("lorafit.serve")


class UnknownAdapter(LorafitError):
    """The request names an adapter that is not loaded (HTTP 404)."""


class PromptTooLong(LorafitError):
    """The prompt does not fit the model's context (HTTP 400)."""


class ServerBusy(LorafitError):
    """Too many requests are waiting (HTTP 429)."""


class AdapterExists(LorafitError):
    """A load under a name that is already taken (HTTP 409)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks, load tests)


@dataclass
class Event:
    """What a request's sink receives: new text, and on the last event why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "error" on the last event
    error: str | None = None


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    adapter: str | None  # the public name asked for (None: the base model)
    params: SamplingParams
    sink: Callable[[Event], None]
    internal: str | None = None  # the adapter's name inside the model, pinned at submit
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already handed to the sink
    finish_reason: str | None = None
    cancelled: bool = False
    settled: bool = False  # counted out of the running set
    generator: torch.Generator | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_done: float | None = None

    def cancel(self) -> None:
        """Drop the row at the next step (a client that went away); a no-op once finished."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Batch:
    """Running rows and their KV cache: mask (B, L) with each row's real tokens right-aligned."""

    rows: list[Request]
    cache: AppendCache
    mask: torch.Tensor  # (B, L) long
    positions: torch.Tensor  # (B,) the position id of each row's next token
    last: torch.Tensor  # (B,) each row's last sampled token, the next step's input


def _kv(cache: AppendCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    if t.shape[dim] == length:
        return t
    shape = list(t.shape)
    shape[dim] = length - t.shape[dim]
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge_batches(a: _Batch, b: _Batch) -> _Batch:
    """One batch from two: the shorter is left-padded (masked out) to the longer's KV length."""
    length = max(a.mask.shape[1], b.mask.shape[1])
    kv = [(torch.cat([_left_pad(ka, length, 2), _left_pad(kb, length, 2)]),
           torch.cat([_left_pad(va, length, 2), _left_pad(vb, length, 2)]))
          for (ka, va), (kb, vb) in zip(_kv(a.cache), _kv(b.cache))]
    return _Batch(a.rows + b.rows, AppendCache.from_kv(kv),
                  torch.cat([_left_pad(a.mask, length, 1), _left_pad(b.mask, length, 1)]),
                  torch.cat([a.positions, b.positions]), torch.cat([a.last, b.last]))


def select_rows(batch: _Batch, keep: list[int]) -> _Batch | None:
    """The batch without finished rows, its KV trimmed of columns that are padding in every row."""
    if not keep:
        return None
    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask[index]
    start = int((mask.sum(0) > 0).nonzero()[0])  # rows are right-aligned: padding is a prefix
    kv = [(k[index, :, start:], v[index, :, start:]) for k, v in _kv(batch.cache)]
    return _Batch([batch.rows[i] for i in keep], AppendCache.from_kv(kv), mask[:, start:],
                  batch.positions[index], batch.last[index])


class _Router:
    """Keeps `adapter_per_row` entered across decode steps while the batch's rows don't change.

    Routing builds each layer's row layout (and stacks A and B when an adapter joins the batch);
    redoing that each token would cost a good part of a decode step. Only the scheduler uses it, and only under `model_lock`; load and
    delete close it (under the same lock) before touching the model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.key: tuple[str | None, ...] | None = None
        self.stack: contextlib.ExitStack | None = None

    def use(self, rows: list[str | None]) -> None:
        if self.stack is not None and tuple(rows) == self.key:
            return
        self.close()
        stack = contextlib.ExitStack()
        stack.enter_context(lf.adapter_per_row(self.model, rows))
        self.stack, self.key = stack, tuple(rows)

    def close(self) -> None:
        if self.stack is not None:
            self.stack.close()
        self.stack = self.key = None


MIN_SHARED_PREFIX = 8  # tokens: a shorter common prefix does not pay for its extra forward


def shared_prefixes(rows: list[Request]) -> tuple[list[tuple[list[Request], int]], list[Request]]:
    """([(rows, prefix length)], other rows): rows on the same adapter whose prompts start alike.

    A burst of chat requests repeats its system prompt; on one adapter those tokens give the same
    KV in every row, so prefill can compute them once per adapter (on different adapters they
    differ: adapted k/v projections). Each row keeps at least one token of its own to prefill."""
    by_adapter: dict[str | None, list[Request]] = {}
    for r in rows:
        by_adapter.setdefault(r.internal, []).append(r)
    groups, plain = [], []
    for members in by_adapter.values():
        prompts = [r.prompt_ids for r in members]
        common = next((i for i, column in enumerate(zip(*prompts)) if len(set(column)) > 1), min(map(len, prompts)))
        common = min(common, min(map(len, prompts)) - 1)
        if len(members) > 1 and common >= MIN_SHARED_PREFIX:
            groups.append((members, common))
        else:
            plain += members
    return groups, plain


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return {int(i) for i in ids if i is not None}


def check_servable(path: str | Path) -> None:
    """Refuse adapters that cannot share a batch: per-row routing covers LoRA A/B only, and an
    adapter's trained biases or full module copies would change the base under every row."""
    config, state = read_adapter(path)
    problem = ("it is a DoRA adapter" if config.use_dora else
               "it trains biases (bias != 'none')" if state.biases else
               "it has modules_to_save" if state.saved or config.modules_to_save else None)
    if problem:
        raise AdapterError(f"{path}: cannot be served alongside other adapters: {problem}; "
                           "merge it into the base instead (lorafit merge)")


def rss_bytes() -> int:
    """Resident memory of this process from /proc (Linux); 0 where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Engine:
    """Serve `model` (a plain transformers causal LM) with any number of adapters.

    `submit` is thread-safe and returns at once; the request's events arrive on its `sink`
    (called from the scheduler thread). `start()` runs the scheduler; `stop()` ends it."""

    def __init__(self, model: nn.Module, tokenizer, *, base_name: str = "base", max_batch_size: int = 16,
                 max_wait_ms: float = 5.0, context_length: int | None = None, max_waiting: int = 1024,
                 share_prefixes: bool = True) -> None:
        self.model = model.eval()
        self.share_prefixes = share_prefixes  # prefill a prompt prefix common to rows on one adapter once
        self.tokenizer = tokenizer
        # the scheduler decodes with its own copy, so it never shares tokenizer state with the HTTP thread
        self._detokenizer = copy.deepcopy(tokenizer)
        self.base_name = base_name
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_waiting = max_waiting
        self.context_length = context_length or int(getattr(model.config, "max_position_embeddings", 2048))
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = _eos_ids(model, tokenizer)
        self.model_lock = threading.Lock()
        self._state = threading.Condition()  # guards the fields below
        self._adapters: dict[str, str] = {}  # public name -> internal name in the model
        self._paths: dict[str, str] = {}  # public name -> folder it came from
        self._refs: Counter[str] = Counter()  # internal name -> requests holding it
        self._doomed: set[str] = set()  # internal names to delete once unreferenced
        self._waiting: deque[Request] = deque()
        self._running = 0
        self._serial = itertools.count(1)
        self._router = _Router(model)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.completed = 0
        self.tokens_generated = 0

    # -- adapters ---------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT-format adapter folder under a public `name` (LorafitError on any problem)."""
        internal = f"{name}--{next(self._serial)}"  # unique: a reload never reuses running weights
        with self._state:
            if name in self._adapters or name in ("base", self.base_name):
                raise AdapterExists(f"an adapter named {name!r} is already loaded; delete it first")
        check_servable(path)
        with self.model_lock:
            self._router.close()
            lf.load_adapter(self.model, path, adapter=internal, activate=False)
        with self._state:
            lost = name in self._adapters  # a concurrent load of the same name won
            if lost:
                self._doomed.add(internal)
            else:
                self._adapters[name], self._paths[name] = internal, str(path)
        if lost:
            self._collect()
            raise AdapterExists(f"an adapter named {name!r} is already loaded; delete it first")

    def unload_adapter(self, name: str) -> int:
        """Hide `name` from new requests; its weights go once the requests using it end.
        Returns how many requests still hold it."""
        with self._state:
            if name not in self._adapters:
                raise UnknownAdapter(f"no adapter named {name!r} is loaded")
            internal = self._adapters.pop(name)
            self._paths.pop(name, None)
            self._doomed.add(internal)
            holders = self._refs[internal]
        self._collect()
        return holders

    def adapters(self) -> dict[str, str]:
        """Public adapter name -> the folder it was loaded from."""
        with self._state:
            return dict(self._paths)

    def _collect(self) -> None:
        """Delete doomed adapters nobody holds any more (takes the model lock)."""
        with self._state:
            free = [n for n in self._doomed if self._refs[n] == 0]
            self._doomed.difference_update(free)
            for n in free:
                self._refs.pop(n, None)
        if free:
            with self.model_lock:
                self._router.close()
                for n in free:
                    lf.delete_adapter(self.model, n)

    # -- requests ---------------------------------------------------------------------------
    def resolve(self, model_name: str | None) -> str | None:
        """The adapter a request's `model` field names: None for the base model."""
        if model_name in (None, "", "base", self.base_name):
            return None
        with self._state:
            if model_name not in self._adapters:
                raise UnknownAdapter(f"the model {model_name!r} does not exist; loaded: "
                                     f"{[self.base_name, *sorted(self._adapters)]}")
        return model_name

    def submit(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams,
               sink: Callable[[Event], None]) -> Request:
        if not prompt_ids:
            raise PromptTooLong("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise PromptTooLong(f"the prompt is {len(prompt_ids)} tokens; this model's context is "
                                f"{self.context_length} tokens, including the completion")
        request = Request(list(prompt_ids), adapter, params, sink)
        if params.temperature > 0:
            request.generator = torch.Generator(device=self.device)
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
            request.generator.manual_seed(seed)
        with self._state:
            if adapter is not None:
                if adapter not in self._adapters:
                    raise UnknownAdapter(f"the model {adapter!r} does not exist")
                request.internal = self._adapters[adapter]
                self._refs[request.internal] += 1
            if len(self._waiting) >= self.max_waiting:
                self._release(request)
                raise ServerBusy("the server is busy (too many waiting requests); retry later")
            self._waiting.append(request)
            self._state.notify_all()
        return request

    def _release(self, request: Request) -> None:
        """Give back the request's adapter reference (caller holds `_state`)."""
        if request.internal is not None:
            self._refs[request.internal] -= 1
            request.internal = None

    def _settle(self, request: Request) -> None:
        """Count a running request out, once (caller holds `_state`)."""
        if not request.settled:
            request.settled = True
            self._release(request)
            self._running -= 1
            self.completed += request.done

    def stats(self) -> dict[str, int]:
        with self._state:
            return {"running": self._running, "waiting": len(self._waiting), "adapters": len(self._adapters),
                    "completed": self.completed, "tokens_generated": self.tokens_generated,
                    "rss_bytes": rss_bytes()}

    # -- scheduler --------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lorafit-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._state:
            self._stopping = True
            self._state.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _admit(self, free: int, block: bool) -> list[Request]:
        """Up to `free` waiting requests. With nothing running, wait for the first one and then up
        to `max_wait` for company, so a burst of requests starts as one batch."""
        with self._state:
            if block:
                while not self._waiting and not self._stopping:
                    self._state.wait(0.5)
                deadline = time.monotonic() + self.max_wait
                while len(self._waiting) < free and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._state.wait(left)
            taken: list[Request] = []
            dropped = False
            while self._waiting and len(taken) < free:
                request = self._waiting.popleft()
                if request.cancelled:  # its client left while it waited
                    self._release(request)
                    dropped = True
                    continue
                taken.append(request)
            self._running += len(taken)
        if dropped:
            self._collect()
        return taken

    def _loop(self) -> None:
        batch: _Batch | None = None
        while not self._stopping:
            new: list[Request] = []
            try:
                if batch is not None:
                    self._decode(batch)
                new = self._admit(self.max_batch_size - (len(batch.rows) if batch else 0), block=batch is None)
                if new:
                    fresh = self._prefill(new)
                    batch = fresh if batch is None else merge_batches(batch, fresh)
            except Exception as e:  # a bug must fail its requests, not kill the server
                log.exception("generation step failed")
                rows = list({id(r): r for r in (batch.rows if batch else []) + new}.values())
                for r in rows:
                    if not r.done:
                        r.finish_reason = "error"
                        r.sink(Event("", [], "error", f"{type(e).__name__}: {e}"))
                self._retire(rows)
                batch = None
                continue
            if batch is not None:
                gone = [r for r in batch.rows if r.done or r.cancelled]
                if gone:
                    self._retire(gone)
                    batch = select_rows(batch, [i for i, r in enumerate(batch.rows) if not (r.done or r.cancelled)])
        with self.model_lock:
            self._router.close()

    def _retire(self, gone: list[Request]) -> None:
        """Give back finished rows' adapters and delete doomed adapters nobody holds any more."""
        with self._state:
            for r in gone:
                self._settle(r)
        self._collect()

    @torch.inference_mode()
    def _forward(self, rows: list[Request], **inputs) -> torch.Tensor:
        with self.model_lock:
            self._router.use([r.internal for r in rows])
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()  # (B, vocab)

    def _prefill(self, rows: list[Request]) -> _Batch:
        """Prefill newly admitted rows; rows that share an adapter and a prompt prefix compute
        that prefix once (see `shared_prefixes`), the rest are prefilled as they are."""
        groups, plain = shared_prefixes(rows) if self.share_prefixes else ([], rows)
        parts = ([self._prefill_plain(plain)] if plain else []) + ([self._prefill_shared(groups)] if groups else [])
        return parts[0] if len(parts) == 1 else merge_batches(*parts)

    def _left_padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), each (len(seqs), longest), every sequence right-aligned."""
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, length - len(s):] = torch.tensor(s)
                mask[i, length - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _prefill_plain(self, rows: list[Request]) -> _Batch:
        ids, mask = self._left_padded([r.prompt_ids for r in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = AppendCache()
        logits = self._forward(rows, input_ids=ids, attention_mask=mask, position_ids=positions,
                               past_key_values=cache)
        return self._started(rows, cache, mask, logits)

    def _prefill_shared(self, groups: list[tuple[list[Request], int]]) -> _Batch:
        """One forward over each group's shared prefix (one row per group), its KV copied to every
        row of the group, then one forward over every row's own rest of the prompt.

        The KV layout is [prefix, left-padded; rest, left-padded]: padding columns in the middle
        are masked like any other, and position ids continue from each group's prefix length."""
        heads = [members[0] for members, _ in groups]
        ids, mask = self._left_padded([head.prompt_ids[:p] for head, (_, p) in zip(heads, groups)])
        cache = AppendCache()
        self._forward(heads, input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                      past_key_values=cache)
        rows = [r for members, _ in groups for r in members]
        owner = torch.tensor([g for g, (members, _) in enumerate(groups) for _ in members], device=self.device)
        starts = [p for members, p in groups for _ in members]
        cache = AppendCache.from_kv([(k.index_select(0, owner), v.index_select(0, owner)) for k, v in _kv(cache)])
        rest_ids, rest_mask = self._left_padded([r.prompt_ids[p:] for r, p in zip(rows, starts)])
        mask = torch.cat([mask.index_select(0, owner), rest_mask], dim=1)
        positions = torch.tensor(starts, device=self.device)[:, None] + (rest_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(rows, input_ids=rest_ids, attention_mask=mask, position_ids=positions,
                               past_key_values=cache)
        return self._started(rows, cache, mask, logits)

    def _started(self, rows: list[Request], cache: AppendCache, mask: torch.Tensor, logits: torch.Tensor) -> _Batch:
        """The prefilled rows as a running batch, their first token sampled and sent."""
        last = self._sample(logits, rows)
        batch = _Batch(rows, cache, mask, mask.sum(-1), last)
        self._emit(rows, last)
        return batch

    def _decode(self, batch: _Batch) -> None:
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        logits = self._forward(batch.rows, input_ids=batch.last[:, None], attention_mask=batch.mask,
                               position_ids=batch.positions[:, None], past_key_values=batch.cache)
        batch.positions = batch.positions + 1
        batch.last = self._sample(logits, batch.rows)
        self._emit(batch.rows, batch.last)

    def _sample(self, logits: torch.Tensor, rows: list[Request]) -> torch.Tensor:
        """Greedy for temperature 0, else temperature + nucleus (top_p) sampling, per row."""
        tokens = logits.argmax(-1)
        for i, r in enumerate(rows):
            p = r.params
            if p.temperature <= 0:
                continue
            probs = torch.softmax(logits[i] / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                drop = sorted_p.cumsum(0) - sorted_p >= p.top_p  # keep the smallest set reaching top_p
                sorted_p[drop] = 0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            tokens[i] = torch.multinomial(probs, 1, generator=r.generator)[0]
        return tokens

    def _emit(self, rows: list[Request], tokens: torch.Tensor) -> None:
        """Append each row's new token, decide whether it is finished, send the new text."""
        now = time.perf_counter()
        for r, token in zip(rows, tokens.tolist()):
            if r.done or r.cancelled:
                continue
            r.t_first = r.t_first or now
            new_ids: list[int] = []
            if token in self.eos_ids and not r.params.ignore_eos:
                r.finish_reason = "stop"
            else:
                r.output_ids.append(token)
                new_ids = [token]
                r.text = self._detokenizer.decode(r.output_ids, skip_special_tokens=True)
                self.tokens_generated += 1
                cuts = [i for i in (r.text.find(s) for s in r.params.stop if s) if i >= 0]
                if cuts:  # (text already sent cannot be taken back)
                    r.text, r.finish_reason = r.text[:max(min(cuts), r.sent)], "stop"
                elif len(r.output_ids) >= r.params.max_tokens or \
                        len(r.prompt_ids) + len(r.output_ids) >= self.context_length:
                    r.finish_reason = "length"
            self._send(r, new_ids, now)

    def _send(self, r: Request, new_ids: list[int], now: float) -> None:
        if r.done:
            end = len(r.text)
            r.t_done = now
            with self._state:  # settle before the caller hears the request is done
                self._settle(r)
        else:  # hold back what may be the start of a stop string or half of a UTF-8 character
            hold = max((len(s) - 1 for s in r.params.stop), default=0)
            end = len(r.text) - hold
            while end > r.sent and r.text[end - 1] == "\ufffd":
                end -= 1
        delta = r.text[r.sent:end] if end > r.sent else ""
        r.sent = max(r.sent, end)
        if delta or new_ids or r.done:
            r.sink(Event(delta, new_ids, r.finish_reason))
