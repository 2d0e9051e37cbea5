"""The batch scheduler: one base model, many LoRA adapters, each request on its own adapter.

A single scheduler thread owns every forward pass. Requests wait in a queue; each loop turn
decodes one token for every running row and then admits waiting requests (prefilling them in one
forward and splicing their KV cache into the running batch), so a new request never waits for a
long one to finish (continuous batching). Rows with different adapters share every forward
through `lorafit.adapter_per_row` (router.py), so eight adapters cost one base matmul per layer,
not eight (plus two batched low-rank matmuls, `lorafit.ops.multi_lora`). Requests admitted
together on one adapter whose prompts start alike prefill that prefix once (prefix.py). The KV
cache (kvcache.py) appends each step's column in place, and keeps the recurrent state of linear-attention,
Mamba and convolution layers per row (Qwen3.5, Qwen3-Next, Granite 4, LFM2); batches merge and shrink
in batch.py.

`generate` runs the same prefill, decode and sampling steps to completion in the caller's thread, without
the scheduler: in-process generation, e.g. GRPO's rollouts. A `live` engine generates with the model as it
is (its active adapters, read at every forward; nothing copied, stacked or loaded), so training code
samples from the very tensors it trains, and each sampled token's log-prob comes back with it
(`SamplingParams.sample_logprobs`).

The parts around the loop: adapters.py (names, references, safe unload), sampling.py (the next
token), detok.py (ids to text and stop strings, a few tokens of work per token), requests.py
(what a request is). `model_lock` guards the model: adapter load, delete and forward never overlap.
Every tensor the engine makes is made on the model's device.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import re
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lorafit.device import model_device
from lorafit.errors import AdapterError, LorafitError
from lorafit.io import read_prompt_format
from lorafit.prompt import CHAT, PromptFormat, default_format, stop_ids
from lorafit.sequence_state import keeps_recurrent_state
from lorafit.serve.adapters import AdapterRegistry
from lorafit.serve.batch import Batch, kv, left_padded, merge_batches, select_rows
from lorafit.serve.detok import TextStream
from lorafit.serve.kvcache import AppendCache
from lorafit.serve.prefix import shared_prefixes, sliding_window
from lorafit.serve.requests import Event, PromptTooLong, Request, SamplingParams, ServerBusy, UnknownAdapter
from lorafit.serve.router import Router
from lorafit.serve.sampling import make_generator, sample, sampled_logprobs, token_logprobs

log = logging.getLogger("lorafit.serve")
# transformers (5.x) announces it will rename the forward's `past_key_values` keyword, which the engine
# passes its cache as, on every forward; the keyword works in every transformers lorafit supports, and a
# server's log is no place for a message to lorafit's developers
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)

__all__ = ["Engine", "Event", "Request", "SamplingParams", "rss_bytes"]


def rss_bytes() -> int:
    """Resident memory of this process from /proc (Linux); 0 where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def state_outside_cache(model: nn.Module) -> str | None:
    """Why this model's sequence state would not live in the engine's cache (`AppendCache`, a transformers
    `Cache` with attention and linear-attention layers), or None: RWKV passes its own `state`, xLSTM its own
    cache class."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    arg = next((params[n] for n in ("cache", "past_key_values") if n in params), None)
    if arg is None:
        return "takes no cache argument" + (" (it passes its own `state`)" if "state" in params else "")
    own = sorted(set(re.findall(r"\b(\w*Cache)\b", str(arg.annotation))) - {"Cache", "DynamicCache"})
    return f"keeps its state in its own {own[0]}" if own else None


def _discard(event: Event) -> None:
    """The sink of a request made by `Engine.generate`: its caller reads the finished request instead."""


class Engine:
    """Serve `model` (a plain transformers causal LM) with any number of adapters.

    `submit` is thread-safe and returns at once; the request's events arrive on its `sink`
    (called from the scheduler thread). `start()` runs the scheduler; `stop()` ends it."""

    def __init__(self, model: nn.Module, tokenizer, *, base_name: str = "base", max_batch_size: int = 16,
                 max_wait_ms: float = 5.0, context_length: int | None = None, max_waiting: int = 1024,
                 share_prefixes: bool = True, live: bool = False) -> None:
        outside = state_outside_cache(model)
        if outside:
            raise LorafitError(f"{type(model).__name__}: serving keeps each row's state in transformers' cache, and "
                               f"{model.config.model_type!r} {outside}, which the batching engine cannot split by row; "
                               "serve a model whose forward takes a transformers Cache")
        self.live = live  # generate with the model's own active adapters: no routing, no adapters of our own
        self.model = model if live else model.eval()
        # prefill a prompt prefix common to rows on one adapter once; not where a layer keeps a recurrent state
        # (the padding between a shared prefix and a row's rest would run through that state)
        self.recurrent = keeps_recurrent_state(model.config)
        self.share_prefixes = share_prefixes and not self.recurrent
        self.window = sliding_window(model.config)  # sliding-window attention: limits prefix sharing
        self.tokenizer = tokenizer
        # the scheduler decodes with its own copy, so it never shares tokenizer state with the HTTP thread
        self._detokenizer = copy.deepcopy(tokenizer)
        self.base_name = base_name
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_waiting = max_waiting
        self.context_length = context_length or int(getattr(model.config, "max_position_embeddings", 2048))
        self.device = model_device(model)
        # The last position as an index tensor, not `logits_to_keep=1`: indexing copies the (B, 1, dim)
        # hidden states into a contiguous tensor, while the int's slice leaves a strided view, which
        # torch.matmul cannot fold into one mm when the head's weight is frozen: it then runs a bmm that
        # reads the whole head weight once per row (105 ms of a 730 ms SmolLM2 prefill of 32 x 17).
        self._last_position = torch.tensor([-1], device=self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = stop_ids(tokenizer, getattr(model, "generation_config", None))  # EOS, end-of-turn
        self.model_lock = threading.Lock()
        self.router = Router(model)
        self.registry = AdapterRegistry(model, self.model_lock, self.router, reserved=("base", base_name))
        self._state = threading.Condition()  # guards the fields below
        self._waiting: deque[Request] = deque()
        self._running = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.completed = 0
        self.tokens_generated = 0
        self._logprobs: dict[int, tuple | None] = {}  # the last step's log-probs per row (`_sample` -> `_emit`)
        self._sampled: torch.Tensor | None = None  # the last step's sampled log-probs (`_sample` -> `_emit`)

    # -- adapters ---------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT-format adapter folder under a public `name` (LorafitError on any problem), with
        the prompt format it was trained with (`lorafit_prompt.json`; none: the tokenizer's default)."""
        if self.live:
            raise LorafitError("a live engine generates with the model's own active adapters; load adapters "
                               "into the model itself, or serve them from an engine that is not live")
        fmt = read_prompt_format(path) if Path(path).is_dir() else None
        if fmt is not None and fmt.kind == CHAT and not self.tokenizer.chat_template:
            raise AdapterError(f"{path}: the adapter was trained through a chat template, and this base "
                               "model's tokenizer has none: serve it on the base it was trained on")
        self.registry.load(name, path, fmt)

    def prompt_format(self, adapter: str | None) -> PromptFormat:
        """How chat messages for `adapter` (None: the base) are rendered: the format it was trained
        with, else the tokenizer's default (its chat template, else lorafit's instruction format)."""
        fmt = self.registry.prompt_format(adapter) if adapter is not None else None
        return fmt or default_format(self.tokenizer)

    def unload_adapter(self, name: str) -> int:
        """Hide `name` from new requests; its weights go once the requests using it end.
        Returns how many requests still hold it."""
        return self.registry.unload(name)

    def adapters(self) -> dict[str, str]:
        """Public adapter name -> the folder it was loaded from."""
        return self.registry.paths()

    # -- requests ---------------------------------------------------------------------------
    def resolve(self, model_name: str | None) -> str | None:
        """The adapter a request's `model` field names: None for the base model."""
        if model_name in (None, "", "base", self.base_name):
            return None
        if not self.registry.exists(model_name):
            raise UnknownAdapter(f"the model {model_name!r} does not exist; loaded: "
                                 f"{[self.base_name, *self.registry.names()]}")
        return model_name

    def check_prompt(self, n_tokens: int) -> None:
        """PromptTooLong unless a prompt of `n_tokens` leaves room for at least one new token."""
        if n_tokens == 0:
            raise PromptTooLong("the prompt is empty")
        if n_tokens >= self.context_length:
            raise PromptTooLong(f"the prompt is {n_tokens} tokens; this model's context is "
                                f"{self.context_length} tokens, including the completion")

    def submit(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams,
               sink: Callable[[Event], None]) -> Request:
        """Queue a request: `prompt_ids` on `adapter` (None: the base), sampled with `params`. Returns at
        once; `sink` then receives Events from the scheduler thread, the last with its finish_reason.
        Raises UnknownAdapter, PromptTooLong or ServerBusy (LorafitErrors) instead of queueing."""
        self.check_prompt(len(prompt_ids))
        request = Request(list(prompt_ids), adapter, params, sink,
                          stream=TextStream(self._decode, params.stop),
                          generator=make_generator(params, self.device))
        if adapter is not None:
            request.internal = self.registry.acquire(adapter)
        with self._state:
            busy = len(self._waiting) >= self.max_waiting
            if not busy:
                self._waiting.append(request)
                self._state.notify_all()
        if busy:
            self._release(request)
            raise ServerBusy("the server is busy (too many waiting requests); retry later")
        return request

    def _decode(self, ids: list[int]) -> str:
        return self._detokenizer.decode(ids, skip_special_tokens=True)

    def _release(self, request: Request) -> None:
        """Give back the request's adapter reference, once."""
        internal, request.internal = request.internal, None
        self.registry.release(internal)

    def _settle(self, request: Request) -> None:
        """Count a running request out, once."""
        with self._state:
            if request.settled:
                return
            request.settled = True
            self._running -= 1
            self.completed += request.done
        self._release(request)

    def stats(self) -> dict[str, int]:
        """Counters for monitoring: running and waiting requests, loaded adapters, completed requests,
        tokens generated, and the process's resident memory in bytes."""
        adapters = len(self.registry.names())
        with self._state:
            return {"running": self._running, "waiting": len(self._waiting), "adapters": adapters,
                    "completed": self.completed, "tokens_generated": self.tokens_generated,
                    "rss_bytes": rss_bytes()}

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Request]:
        """Generate every prompt to its end in the calling thread (the scheduler thread must not be running),
        with the scheduler's own steps: admission up to `max_batch_size` rows, shared-prefix prefill, decode,
        per-row sampling. Returns the finished requests (`output_ids`, `finish_reason`, `stop_token`, and
        `sampled_logprobs` where asked for), in the order of `prompts`. The model is in eval mode meanwhile
        and back in its own mode afterwards."""
        if self._thread is not None:
            raise LorafitError("Engine.generate runs in the caller's thread: stop() the scheduler first")
        for ids in prompts:
            self.check_prompt(len(ids))
        requests = [Request(list(ids), None, p, _discard, stream=TextStream(self._decode, p.stop),
                            generator=make_generator(p, self.device)) for ids, p in zip(prompts, params)]
        waiting = deque(requests)
        was_training = self.model.training
        self.model.eval()
        batch: Batch | None = None
        try:
            while waiting or batch is not None:
                if batch is not None:
                    self._decode_step(batch)
                    batch = self._without_finished(batch)
                free = self.max_batch_size - (len(batch.rows) if batch else 0)
                new = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                if new:
                    with self._state:
                        self._running += len(new)
                    fresh = self._prefill(new)
                    batch = fresh if batch is None else merge_batches(batch, fresh)
                if batch is not None:
                    batch = self._without_finished(batch)  # rows finished by their first token
        finally:
            self.model.train(was_training)
        return requests

    # -- scheduler --------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the scheduler thread (once; later calls do nothing) and return the engine."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lorafit-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """End the scheduler thread and wait for it."""
        with self._state:
            self._stopping = True
            self._state.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _admit(self, free: int, block: bool) -> list[Request]:
        """Up to `free` waiting requests. With nothing running, wait for the first one and then up
        to `max_wait` for company, so a burst of requests starts as one batch."""
        dropped: list[Request] = []
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
            while self._waiting and len(taken) < free:
                request = self._waiting.popleft()
                (dropped if request.cancelled else taken).append(request)  # cancelled: its client left
            self._running += len(taken)
        if dropped:
            for request in dropped:
                self._release(request)
            self.registry.collect()
        return taken

    def _loop(self) -> None:
        batch: Batch | None = None
        while not self._stopping:
            new: list[Request] = []
            try:
                if batch is not None:
                    self._decode_step(batch)
                    # rows that just finished leave first: an emptied batch makes the engine idle, so the
                    # next burst is awaited for `max_wait` as one batch instead of taken piecemeal
                    batch = self._without_finished(batch)
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
                batch = self._without_finished(batch)  # rows finished by their first token
        with self.model_lock:
            self.router.close()

    def _without_finished(self, batch: Batch) -> Batch | None:
        """The batch less its finished and cancelled rows (retired); None when none is left."""
        gone = [r for r in batch.rows if r.done or r.cancelled]
        if not gone:
            return batch
        self._retire(gone)
        return select_rows(batch, [i for i, r in enumerate(batch.rows) if not (r.done or r.cancelled)])

    def _retire(self, gone: list[Request]) -> None:
        """Give back finished rows' adapters and delete doomed adapters nobody holds any more."""
        for r in gone:
            self._settle(r)
        self.registry.collect()

    @torch.inference_mode()
    def _forward(self, rows: list[Request], every_position: bool = False, **inputs) -> torch.Tensor:
        """The logits of the last position (B, vocab) in fp32, or with `every_position` all of them
        (B, T, vocab) in the model's dtype (prompt log-probs)."""
        with self.model_lock:
            if not self.live:
                self.router.use([r.internal for r in rows])
            out = self.model(**inputs, use_cache=True, logits_to_keep=0 if every_position else self._last_position)
        return out.logits if every_position else out.logits[:, -1].float()

    def _prefill(self, rows: list[Request]) -> Batch:
        """Prefill newly admitted rows; rows that share an adapter and a prompt prefix compute
        that prefix once (see `shared_prefixes`), the rest are prefilled as they are. Rows that ask
        for their prompt's log-probs are prefilled whole."""
        echo = [r for r in rows if r.params.prompt_logprobs is not None]
        rows = [r for r in rows if r.params.prompt_logprobs is None]
        groups, plain = shared_prefixes(rows, self.window) if self.share_prefixes else ([], rows)
        plain = echo + plain
        parts = ([self._prefill_plain(plain)] if plain else []) + ([self._prefill_shared(groups)] if groups else [])
        return parts[0] if len(parts) == 1 else merge_batches(*parts)

    def _prefill_plain(self, rows: list[Request]) -> Batch:
        ids, mask = left_padded([r.prompt_ids for r in rows], self.pad_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = AppendCache(self.model.config)
        echo = any(r.params.prompt_logprobs is not None for r in rows)
        logits = self._forward(rows, every_position=echo, input_ids=ids, attention_mask=mask, position_ids=positions,
                               past_key_values=cache)
        if echo:  # (B, T, vocab): the prompt's log-probs, then the last position's logits as usual
            width = ids.shape[1]
            for i, r in enumerate(rows):
                k = r.params.prompt_logprobs
                if k is not None:  # row i's prompt fills its last len(prompt) columns; column t predicts t+1
                    n = len(r.prompt_ids)
                    targets = ids[i, width - n + 1:]  # (n-1,)
                    r.prompt_logprobs = [None, *token_logprobs(logits[i, width - n:width - 1], targets, k)]
            logits = logits[:, -1].float()
        return self._started(rows, cache, mask, logits)

    def _prefill_shared(self, groups: list[tuple[list[Request], int]]) -> Batch:
        """One forward over each group's shared prefix (one row per group), its KV copied to every
        row of the group, then one forward over every row's own rest of the prompt.

        The KV layout is [prefix, left-padded; rest, left-padded]: padding columns in the middle
        are masked like any other, and position ids continue from each group's prefix length."""
        heads = [members[0] for members, _ in groups]
        ids, mask = left_padded([head.prompt_ids[:p] for head, (_, p) in zip(heads, groups)], self.pad_id,
                                self.device)
        cache = AppendCache()
        self._forward(heads, input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                      past_key_values=cache)
        rows = [r for members, _ in groups for r in members]
        owner = torch.tensor([g for g, (members, _) in enumerate(groups) for _ in members], device=self.device)
        starts = [p for members, p in groups for _ in members]
        cache = AppendCache.from_kv([(k.index_select(0, owner), v.index_select(0, owner)) for k, v in kv(cache)])
        rest_ids, rest_mask = left_padded([r.prompt_ids[p:] for r, p in zip(rows, starts)], self.pad_id, self.device)
        mask = torch.cat([mask.index_select(0, owner), rest_mask], dim=1)
        positions = torch.tensor(starts, device=self.device)[:, None] + (rest_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(rows, input_ids=rest_ids, attention_mask=mask, position_ids=positions,
                               past_key_values=cache)
        return self._started(rows, cache, mask, logits)

    def _started(self, rows: list[Request], cache: AppendCache, mask: torch.Tensor, logits: torch.Tensor) -> Batch:
        """The prefilled rows as a running batch, their first token sampled and sent."""
        last = self._sample(logits, rows)
        batch = Batch(rows, cache, mask, mask.sum(-1), last)
        self._emit(rows, last)
        return batch

    def _decode_step(self, batch: Batch) -> None:
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        logits = self._forward(batch.rows, input_ids=batch.last[:, None], attention_mask=batch.mask,
                               position_ids=batch.positions[:, None], past_key_values=batch.cache)
        batch.positions = batch.positions + 1
        batch.last = self._sample(logits, batch.rows)
        self._emit(batch.rows, batch.last)

    def _sample(self, logits: torch.Tensor, rows: list[Request]) -> torch.Tensor:
        params = [r.params for r in rows]
        tokens = sample(logits, params, [r.generator for r in rows])
        self._sampled = sampled_logprobs(logits, tokens, params) if any(p.sample_logprobs for p in params) else None
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        self._logprobs = dict.fromkeys(range(len(rows)))  # row -> TokenLogprob of this step, for `_emit`
        if wanted:
            index = torch.tensor(wanted, device=logits.device)
            top = max(rows[i].params.logprobs for i in wanted)
            for i, entry in zip(wanted, token_logprobs(logits[index], tokens[index], top)):
                self._logprobs[i] = (entry[0], entry[1], entry[2][:rows[i].params.logprobs])
        return tokens

    def _emit(self, rows: list[Request], tokens: torch.Tensor) -> None:
        """Append each row's new token, decide whether it is finished, send the new text."""
        now = time.perf_counter()
        logps = self._sampled.tolist() if self._sampled is not None else None
        for i, (r, token) in enumerate(zip(rows, tokens.tolist())):
            if r.done or r.cancelled:
                continue
            r.t_first = r.t_first or now
            logprob = self._logprobs.get(i)
            if logps is not None and r.params.sample_logprobs:
                r.sampled_logprobs.append(logps[i])
            if token in self.eos_ids and not r.params.ignore_eos:
                r.finish_reason = "stop"  # a stop token is not part of the text; its log-prob is (OpenAI's too)
                r.stop_token = token
                self._send(r, r.stream.flush(r.output_ids)[0], [], now, logprob)
                continue
            r.output_ids.append(token)
            self.tokens_generated += 1
            text, stopped = r.stream.push(r.output_ids)
            if stopped:
                r.finish_reason = "stop"
            elif len(r.output_ids) >= r.params.max_tokens or \
                    len(r.prompt_ids) + len(r.output_ids) >= self.context_length:
                rest, stopped = r.stream.flush(r.output_ids)
                text += rest
                r.finish_reason = "stop" if stopped else "length"
            self._send(r, text, [token], now, logprob)

    def _send(self, r: Request, text: str, new_ids: list[int], now: float, logprob=None) -> None:
        if r.done:
            r.t_done = now
            self._settle(r)  # settle before the caller hears the request is done
        if text or new_ids or r.done:
            r.sink(Event(text, new_ids, r.finish_reason, logprobs=None if logprob is None else [logprob]))
