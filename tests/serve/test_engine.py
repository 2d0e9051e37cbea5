"""The scheduler in-process: mixed-adapter batches give each request exactly its solo tokens."""

from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import lorafit as lf
from lorafit.errors import AdapterError
from lorafit.io import read_adapter
from lorafit.lora.inject import adapter_configs
from lorafit.model import load_model
from lorafit.serve.adapters import check_servable
from lorafit.serve.engine import Engine
from lorafit.serve.prefix import MIN_SHARED_PREFIX, shared_prefixes
from lorafit.serve.requests import Event, Request, SamplingParams, UnknownAdapter
from tests.serve.tiny import randomize

TORCH_DIR = str(Path(torch.__file__).parent)
LORAFIT_DIR = Path(lf.__file__).parent
PROMPTS = ["hello world", "the quick brown fox jumps", "a", "a server answers many clients at once, and then"]


class Sink:
    """Collects one request's events (the engine calls it from its thread)."""

    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.seen: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.put(event)

    def first(self, timeout: float = 30) -> None:
        """Wait until the request has produced its first token (the event stays for `result`)."""
        if not self.seen:
            self.seen.append(self.events.get(timeout=timeout))

    def result(self, timeout: float = 60) -> tuple[list[int], str, str]:
        ids, text = [], ""
        while True:
            e = self.seen.pop(0) if self.seen else self.events.get(timeout=timeout)
            ids += e.token_ids
            text += e.text
            if e.finish_reason:
                return ids, text, e.finish_reason


def solo(model, tokenizer, prompt_ids: list[int], adapter: str | None, n: int) -> list[int]:
    """The reference: transformers' own greedy generate, one request, its adapter set the usual way."""
    ids = torch.tensor([prompt_ids])
    kwargs = {"max_new_tokens": n, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    if adapter is None:
        with lf.disable_adapters(model):
            out = model.generate(ids, **kwargs)
    else:
        lf.set_adapter(model, adapter)
        out = model.generate(ids, **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    return new[: new.index(eos)] if eos in new else new


def run_mixed(engine: Engine, jobs: list[tuple[list[int], str | None]], n: int, late: int = 0) -> list[list[int]]:
    """Submit `jobs` (the last `late` of them once the first batch is decoding) and collect tokens."""
    sinks = [Sink() for _ in jobs]
    early = len(jobs) - late
    for (ids, adapter), sink in zip(jobs[:early], sinks):
        engine.submit(ids, adapter, SamplingParams(max_tokens=n), sink)
    if late:
        sinks[0].first()  # the first batch is running: the rest must join it mid-flight
        for (ids, adapter), sink in zip(jobs[early:], sinks[early:]):
            engine.submit(ids, adapter, SamplingParams(max_tokens=n), sink)
    return [s.result()[0] for s in sinks]


@pytest.fixture
def tiny_engine(tiny):
    model_dir, adapters = tiny
    model, tokenizer = load_model(model_dir)
    engine = Engine(model, tokenizer, base_name="tiny", max_batch_size=16, max_wait_ms=20)
    for name in ("alpha", "beta", "gamma"):
        engine.load_adapter(name, adapters[name])
    yield engine.start()
    engine.stop()


def test_mixed_batch_equals_solo_runs(tiny, tiny_engine):
    model_dir, adapters = tiny
    tokenizer = tiny_engine.tokenizer
    ref, _ = load_model(model_dir)
    for name in ("alpha", "beta", "gamma"):
        lf.load_adapter(ref, adapters[name], adapter=name, activate=False)
    names = [None, "alpha", "beta", "gamma"]
    jobs = [(tokenizer(p).input_ids, names[(i + j) % 4]) for i, p in enumerate(PROMPTS) for j in range(3)]
    n = 12
    got = run_mixed(tiny_engine, jobs, n, late=4)  # 8 start together, 4 join a running batch
    want = [solo(ref, tokenizer, ids, adapter, n) for ids, adapter in jobs]
    assert got == want
    # the adapters matter: the same prompt gives different tokens on each of them and the base
    by_adapter = {adapter: out for (ids, adapter), out in zip(jobs, want) if ids == jobs[0][0]}
    assert len({tuple(v) for v in by_adapter.values()}) == len(by_adapter) == 3
    assert tiny_engine.stats()["running"] == 0


def test_shared_prompt_prefixes_give_solo_tokens(tiny, tiny_engine):
    """Rows on one adapter starting with the same tokens prefill that prefix once; tokens unchanged."""
    model_dir, adapters = tiny
    tokenizer = tiny_engine.tokenizer
    ref, _ = load_model(model_dir)
    for name in ("alpha", "beta"):
        lf.load_adapter(ref, adapters[name], adapter=name, activate=False)
    system = "you are a helpful server that answers many clients at once, and then some more:"
    tails = ["hello world", "the quick brown fox jumps", "a", "what comes next?"]
    jobs = [(tokenizer(system + " " + t).input_ids, a) for t in tails for a in ("alpha", None)]
    jobs += [(tokenizer("the quick brown fox").input_ids, "beta")]  # alone on its adapter: plain prefill
    requests = [Request(ids, None, SamplingParams(), print, internal=a) for ids, a in jobs]
    groups, plain = shared_prefixes(requests)
    assert sorted(len(members) for members, _ in groups) == [4, 4] and len(plain) == 1
    assert all(p >= MIN_SHARED_PREFIX for _, p in groups)
    n = 10
    want = [solo(ref, tokenizer, ids, adapter, n) for ids, adapter in jobs]
    assert run_mixed(tiny_engine, jobs, n) == want
    assert run_mixed(tiny_engine, jobs, n, late=3) == want  # shared-prefix rows joining a running batch


@pytest.fixture
def one_thread():
    """SmolLM2 on CPU cores shared with other jobs runs faster on one torch thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smollm2_mixed_batch_equals_solo_runs(smollm2_dir, tmp_path, one_thread):
    model, tokenizer = load_model(smollm2_dir)
    names = ["sql", "poem", "math"]
    for i, name in enumerate(names):
        lf.add_adapter(model, lf.LoraConfig(r=4 + 2 * i, target_modules=["q_proj", "v_proj", "down_proj"]), name)
        randomize(model, name, seed=7 + i, std=0.05)
        lf.save_adapter(model, tmp_path / name, adapter=name)
    questions = ["What is the capital of France?", "Write a haiku about rain.", "What is 12 times 12?",
                 "Name a color."]
    jobs = [(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"], a)
            for q, a in zip(questions, [None, *names])]
    want = [solo(model, tokenizer, ids, adapter, 6) for ids, adapter in jobs]
    assert solo(model, tokenizer, jobs[1][0], None, 6) != want[1]  # the adapters change the answers

    engine = Engine(lf.unload(model), tokenizer, base_name="smollm2", max_batch_size=8, max_wait_ms=50)
    for name in names:
        engine.load_adapter(name, tmp_path / name)  # from the files, as a server would
    engine.start()
    try:
        assert run_mixed(engine, jobs, 6) == want
    finally:
        engine.stop()


def test_unload_waits_for_running_requests_and_reload_gets_new_weights(tiny, tiny_engine):
    model_dir, adapters = tiny
    tokenizer, model = tiny_engine.tokenizer, tiny_engine.model
    ids = tokenizer("hello world").input_ids
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    before = Sink()
    tiny_engine.submit(ids, "alpha", params, before)
    expected = before.result()[0]

    running = Sink()
    tiny_engine.submit(ids, "alpha", params, running)
    running.first()
    assert tiny_engine.unload_adapter("alpha") == 1  # still held by the running request
    assert "alpha" not in tiny_engine.adapters()
    with pytest.raises(UnknownAdapter):
        tiny_engine.resolve("alpha")
    tiny_engine.load_adapter("alpha", adapters["delta"])  # same name, other weights, while the old run goes on
    fresh = Sink()
    tiny_engine.submit(ids, "alpha", params, fresh)
    assert running.result()[0] == expected  # finished on the weights it started with
    assert fresh.result()[0] != expected
    deadline = time.monotonic() + 5  # the old weights leave once their last request is done
    while len(adapter_configs(model)) != 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(adapter_configs(model)) == 3


def test_sampling_is_seeded_and_stop_strings_cut(tiny_engine):
    ids = tiny_engine.tokenizer("the lazy dog").input_ids

    def run(**kw) -> tuple[list[int], str, str]:
        sink = Sink()
        tiny_engine.submit(ids, "beta", SamplingParams(**{"max_tokens": 24, **kw}), sink)
        return sink.result()

    a, b = run(temperature=1.0, seed=3), run(temperature=1.0, seed=3)
    assert a == b
    greedy = run()
    assert run(temperature=1.0, top_p=1e-6, seed=5) == greedy  # a tiny nucleus is the argmax
    text = greedy[1]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    _, cut, reason = run(stop=(stop,))
    assert (cut, reason) == (text[: text.find(stop)], "stop")


def test_cancelled_request_frees_its_slot(tiny_engine):
    sink = Sink()
    request = tiny_engine.submit([5, 6, 7], None, SamplingParams(max_tokens=400, ignore_eos=True), sink)
    sink.first()
    request.cancel()
    deadline = time.monotonic() + 5
    while tiny_engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tiny_engine.stats()["running"] == 0 and len(request.output_ids) < 400


def test_a_burst_arriving_as_the_batch_finishes_is_prefilled_as_one(tiny):
    """The last running row finishes; a burst of 4 starts arriving at that moment: the engine is idle
    again, so it waits (up to max_wait) for company and prefills the 4 together, rather than taking
    the first alone and making the rest join it later (which costs a forward and a batch merge)."""
    model_dir, adapters = tiny
    model, tokenizer = load_model(model_dir)
    engine = Engine(model, tokenizer, base_name="tiny", max_batch_size=4, max_wait_ms=0)  # the first runs alone
    engine.load_adapter("alpha", adapters["alpha"])
    prefills: list[int] = []
    prefill = engine._prefill
    engine._prefill = lambda rows: prefills.append(len(rows)) or prefill(rows)
    burst = [Sink() for _ in range(4)]

    def submit(sinks):
        for sink in sinks:
            engine.submit([5, 6, 7], "alpha", SamplingParams(max_tokens=3), sink)

    def first_done(event: Event) -> None:  # runs on the scheduler thread, between two steps
        if event.finish_reason:
            engine.max_wait = 30.0  # seconds: the burst's first request waits for the others (4 fill the batch)
            submit(burst[:1])
            threading.Timer(0.05, submit, (burst[1:],)).start()

    engine.start()
    try:
        engine.submit([5, 6], None, SamplingParams(max_tokens=2, ignore_eos=True), first_done)
        results = [sink.result() for sink in burst]
    finally:
        engine.stop()
    assert prefills == [1, 4]
    assert len({tuple(ids) for ids, _, _ in results}) == 1  # the same prompt on one adapter: the same tokens


def test_prefill_runs_a_frozen_output_head_as_one_matmul(tiny):
    """Prefill keeps the logits of the last position only. Sliced as a strided view, the hidden states
    of a frozen head (every served adapter's base is frozen) go through a bmm that reads the head's
    weight once per row; the engine indexes the position instead, so the head is one mm. Counted with
    the profiler (the kernels below aten::linear), not timed."""
    from torch.profiler import profile

    from lorafit.serve.kvcache import AppendCache

    model_dir, _ = tiny
    model, tokenizer = load_model(model_dir)
    model.requires_grad_(False)
    engine = Engine(model, tokenizer, base_name="tiny")
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = [Request([1], None, SamplingParams(), print) for _ in range(4)]
    ids = torch.randint(3, vocab, (4, 6), generator=torch.Generator().manual_seed(0))
    with profile(record_shapes=True) as prof:
        logits = engine._forward(rows, input_ids=ids, attention_mask=torch.ones_like(ids),
                                 position_ids=torch.arange(6).expand(4, 6), past_key_values=AppendCache())
    torch.testing.assert_close(logits, model(input_ids=ids).logits[:, -1], atol=1e-5, rtol=0)
    head = [e.name for e in prof.events() if e.name in ("aten::mm", "aten::bmm")
            and any(vocab in shape for shape in e.input_shapes if shape)]
    assert head == ["aten::mm"], head


def test_adapters_that_train_biases_are_refused(tmp_path):
    from tests.conftest import make_gpt2

    model = lf.apply_lora(make_gpt2(), lf.LoraConfig(r=2, bias="all"))
    lf.save_adapter(model, tmp_path / "biased")
    with pytest.raises(AdapterError, match="trains biases"):
        check_servable(*read_adapter(tmp_path / "biased"), tmp_path / "biased")


@pytest.mark.parametrize("kind", ["ia3", "experts"])
def test_ia3_and_expert_adapters_are_refused_with_one_line(kind, tmp_path):
    from tests.conftest import make_gpt2
    from tests.lora.test_experts import EXPERTS, make_mixtral

    model, config = ((make_gpt2(), lf.IA3Config()) if kind == "ia3" else
                     (make_mixtral(), lf.LoraConfig(r=2, target_parameters=EXPERTS)))
    lf.save_adapter(lf.apply_lora(model, config), tmp_path / kind)
    with pytest.raises(AdapterError, match="cannot be served alongside") as err:
        check_servable(*read_adapter(tmp_path / kind), tmp_path / kind)
    assert "\n" not in str(err.value)


class HostTensors(TorchFunctionMode):
    """Records tensors made by lorafit code without saying on which device (so on the CPU), and `.cpu()`."""

    FACTORIES = {torch.tensor, torch.as_tensor, torch.full, torch.zeros, torch.ones, torch.empty, torch.arange,
                 torch.rand, torch.randn, torch.randint, torch.eye, torch.linspace}

    def __init__(self) -> None:
        super().__init__()
        self.pinned: list[str] = []
        self.placed = 0  # factory calls from lorafit that named a device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES or func is torch.Tensor.cpu:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
                frame = frame.f_back
            where = Path(frame.f_code.co_filename) if frame is not None else None
            if where is not None and where.is_relative_to(LORAFIT_DIR):
                if func is torch.Tensor.cpu or kwargs.get("device") is None:
                    self.pinned.append(f"{where.name}:{frame.f_lineno} {func.__name__}")
                else:
                    self.placed += 1
        return func(*args, **kwargs)


def test_the_engine_makes_every_tensor_on_the_models_device(tiny, tiny_engine):
    """Run with the scheduler thread watched: no lorafit code in it makes a tensor on the default (CPU) device."""
    tiny_engine.stop()
    watch, loop = HostTensors(), tiny_engine._loop

    def watched_loop() -> None:
        with watch:
            loop()

    tiny_engine._loop = watched_loop  # what start() runs on the scheduler thread
    tiny_engine.start()
    tokenizer = tiny_engine.tokenizer
    system = "you are a helpful server that answers many clients at once, and then some more:"
    jobs = [(tokenizer(system + " " + p).input_ids, a) for p in PROMPTS for a in (None, "alpha", "beta")]
    sinks = [Sink() for _ in jobs]
    for i, ((ids, adapter), sink) in enumerate(zip(jobs, sinks)):
        params = SamplingParams(max_tokens=6 + i % 3, temperature=0.7 * (i % 2), seed=i, stop=("zz",))
        tiny_engine.submit(ids, adapter, params, sink)  # shared prefixes, sampling, stops, rows leaving early
    for sink in sinks:
        sink.result()
    assert watch.placed > 0  # the watch saw the engine make tensors
    assert watch.pinned == []
