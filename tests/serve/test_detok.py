"""Streamed text: exactly the full decode, at a bounded amount of work per token.

The ids come from real SmolLM2 generations (emoji, Chinese and Japanese: characters split over
several byte-level tokens), run through the engine; the decode is the real tokenizer's. Work is
counted (tokens passed to `decode`, characters searched for stop strings), never timed.
"""

from __future__ import annotations

import queue

import pytest
import torch

from lorafit.model import load_model
from lorafit.serve.detok import MAX_HELD, Detokenizer, StopScanner, TextStream
from lorafit.serve.engine import Engine
from lorafit.serve.requests import SamplingParams

LONG = 400
QUESTIONS = [("List ten emoji with their meaning, like 😀 = happy.", 0.0),
             ("Translate into Chinese and Japanese: Good morning, my friend. How are you today?", 0.0),
             ("Write a short poem with emoji and accented words (café, naïve, Ünïcödé).", 1.0)]


class CountingDecode:
    """The real tokenizer's decode, counting the tokens it is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens = 0

    def __call__(self, ids: list[int]) -> str:
        self.tokens += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def generations(smollm2_dir) -> tuple[object, list[tuple[list[int], str]]]:
    """(tokenizer, [(output ids, text the engine streamed)]): LONG tokens for each question."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than two on CPU cores shared with other jobs
    model, tokenizer = load_model(smollm2_dir)
    engine = Engine(model, tokenizer, max_batch_size=4, max_wait_ms=50).start()
    try:
        sinks = []
        for i, (question, temperature) in enumerate(QUESTIONS):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
            sink: queue.Queue = queue.Queue()
            params = SamplingParams(max_tokens=LONG, temperature=temperature, seed=i, ignore_eos=True)
            sinks.append((engine.submit(ids, None, params, sink.put), sink))
        out = []
        for request, sink in sinks:
            parts = []
            while not (event := sink.get(timeout=300)).finish_reason:
                parts.append(event.text)
            out.append((request.output_ids, "".join(parts) + event.text))
    finally:
        engine.stop()
        torch.set_num_threads(threads)
    return tokenizer, out


def streamed(stream: TextStream, ids: list[int]) -> tuple[str, int | None]:
    """(text the stream sends, index of the token that hit a stop string or None), token by token."""
    out, grown = [], []
    for i, token in enumerate(ids):
        grown.append(token)
        text, stopped = stream.push(grown)
        out.append(text)
        if stopped:
            return "".join(out), i
    return "".join(out) + stream.flush(grown)[0], None


def test_engine_streams_exactly_the_full_decode(generations):
    tokenizer, outputs = generations
    for ids, text in outputs:
        assert len(ids) == LONG
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    multibyte = [t for _, t in outputs if any(len(c.encode()) > 1 for c in t)]
    assert len(multibyte) == len(outputs)  # every generation has characters split across byte tokens
    assert any(any(len(c.encode()) == 4 for c in t) for t in multibyte)  # emoji: 4 bytes each


def first_stop(tokenizer, ids: list[int], stop: str) -> int:
    """The index of the token whose arrival makes the decoded text contain `stop`."""
    return next(i for i in range(len(ids)) if stop in tokenizer.decode(ids[:i + 1], skip_special_tokens=True))


def test_stop_strings_spanning_token_boundaries(generations):
    """Two characters either side of a token boundary, and a character split over several tokens."""
    tokenizer, outputs = generations
    decode = CountingDecode(tokenizer)
    for ids, full in outputs:
        texts = [tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
        whole = [k for k in range(LONG // 2, LONG) if texts[k] and full.startswith(texts[k]) and texts[k][-1] != "\ufffd"]
        k = next(k for k in whole if len(full) > len(texts[k]) and full[len(texts[k])] != "\ufffd")
        across = full[len(texts[k]) - 1: len(texts[k]) + 1]  # the characters either side of token boundary k
        split = next(c for c in full if len(c.encode()) > 1)  # e.g. an emoji: several byte-level tokens
        for stop in (across, split):
            text, at = streamed(TextStream(decode, ("never in the text", stop)), ids)
            assert text == full[: full.find(stop)]
            assert at == first_stop(tokenizer, ids, stop)


def work(tokenizer, ids: list[int], stop: tuple[str, ...]) -> tuple[list[int], list[int]]:
    """Per token while streaming `ids`: (tokens passed to decode, characters searched for stop strings)."""
    decode = CountingDecode(tokenizer)
    stream = TextStream(decode, stop)
    grown, decoded, scanned = [], [], []
    for token in ids:
        before = decode.tokens, stream.stops.scanned
        grown.append(token)
        stream.push(grown)
        decoded.append(decode.tokens - before[0])
        scanned.append(stream.stops.scanned - before[1])
    return decoded, scanned


def test_work_grows_linearly_with_the_output(generations):
    """Decoding and the stop-string search cost a bounded amount per token: 4x the tokens, ~4x the
    decoding (decoding the whole output again per token, as before, is 16x: 80,200 tokens for 400),
    and each character is searched at most once plus (longest stop - 1) held-back ones per token."""
    tokenizer, outputs = generations
    stop = ("</answer>", "\n\n\n\n")  # never generated: every token searches
    keep = max(map(len, stop)) - 1
    for ids, text in outputs:
        decoded, scanned = work(tokenizer, ids, stop)
        assert 3.0 < sum(decoded) / sum(decoded[: LONG // 4]) < 5.0, (sum(decoded[: LONG // 4]), sum(decoded))
        assert max(decoded) <= 3 * (MAX_HELD + 1)  # a window of at most MAX_HELD + 1 tokens, decoded <= 3 times
        assert sum(scanned) <= len(text) + keep * LONG  # vs len(text) * LONG / 2 searching all the text each token
        assert all(s <= keep + len(tokenizer.decode(ids[max(i - MAX_HELD, 0): i + 1])) for i, s in enumerate(scanned))


def test_detokenizer_holds_a_split_character_until_it_is_whole():
    data = {1: b"a", 2: b"\xf0\x9f", 3: b"\x98\x80"}  # tokens 2 and 3 are the two halves of an emoji

    def decode(ids: list[int]) -> str:
        return b"".join(data[i] for i in ids).decode("utf-8", "replace")

    detok = Detokenizer(decode)
    assert decode([1, 2]) == "a\ufffd"
    assert (detok.step([1]), detok.step([1, 2]), detok.step([1, 2, 3])) == ("a", "", "😀")


def test_detokenizer_gives_up_on_bytes_that_never_make_a_character():
    def decode(ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", "replace")

    detok, ids, out = Detokenizer(decode), [], []
    for _ in range(3 * MAX_HELD):
        ids.append(0x80)  # a lone continuation byte: never part of a character
        out.append(detok.step(ids))
    out.append(detok.step(ids, final=True))
    assert "".join(out) == decode(ids)
    assert detok.read >= len(ids) - MAX_HELD - 1  # the window kept sliding


def test_stop_scanner_keeps_back_only_a_possible_stop_start():
    scanner = StopScanner(("STOP",))
    assert scanner.feed("hello ST") == ("hello", False)  # " ST" may start "STOP"
    assert scanner.feed("OP and more") == (" ", True)
    scanner = StopScanner(())
    assert scanner.feed("abc") == ("abc", False) and scanner.scanned == 0
