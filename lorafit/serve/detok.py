"""Token ids to streamed text, with bounded work per token, cut at stop strings.

Decoding a request's whole output again for every new token costs O(n) per token, O(n^2) per
request, and so does searching all of it for stop strings. Both are done here on a short window.

`Detokenizer` keeps two offsets into the output ids (as vLLM and TGI do):

    ids:  [ sent for good ... | prefix ... read | read ... end ]
                                 sent: context    not sent yet

and decodes only `ids[prefix:]`, the last sent token(s) plus the new ones. The context is there
for tokenizers whose decode depends on the neighbour (SentencePiece drops the space of a first
"▁word"); what the window decodes to beyond the characters already returned is the new text.
A byte-level token may end in the middle of a UTF-8 character (an emoji spans up to 4 byte
tokens); the decoded window then ends in U+FFFD, and that run of replacement characters is held
back until the character is whole. When the window ends on a whole character it slides forward:
`prefix` moves to `read`, `read` to the end. So each new token decodes about three tokens, and
the text returned, joined, is exactly `decode(ids)`: the window always starts where a character
starts, and a character decodes the same whatever comes before or after it.

One bound keeps a pathological stream linear too: if `MAX_HELD` tokens in a row never complete a
character (a model emitting invalid UTF-8 bytes, which no character can need: one is at most 4
bytes), the replacement characters are taken as final and the window slides anyway.

`StopScanner` holds back the last (longest stop string - 1) characters, which might be the start
of a stop string, and searches only those plus the new text: a stop string that ends in the new
text starts at most that many characters back, and one that ended earlier was found earlier.
"""

from __future__ import annotations

from collections.abc import Callable

MAX_HELD = 16  # tokens that never complete a character before their U+FFFD are taken as final
REPLACEMENT = "\ufffd"


class Detokenizer:
    """`step(ids)` after each new token gives the text it adds; `step(ids, final=True)` the rest."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.prefix = 0  # the window starts here (a character boundary)
        self.read = 0  # ids[prefix:read] are sent: the window's left context
        self.emitted = 0  # characters of decode(ids[prefix:]) already returned

    def step(self, ids: list[int], final: bool = False) -> str:
        text = self.decode(ids[self.prefix:])
        end = len(text)
        if not final and len(ids) - self.read <= MAX_HELD:
            end = len(text.rstrip(REPLACEMENT))  # hold back a character still being spelled
        delta = text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        if end == len(text) and len(ids) > self.read:  # whole characters up to the end: slide
            window = text if self.prefix == self.read else self.decode(ids[self.read:])
            self.prefix, self.read, self.emitted = self.read, len(ids), len(window)
        return delta


class StopScanner:
    """Cuts the text at the first stop string; `scanned` counts the characters searched."""

    def __init__(self, stop: tuple[str, ...] | list[str] = ()) -> None:
        self.stop = tuple(s for s in stop if s)
        self.keep = max((len(s) for s in self.stop), default=1) - 1  # may be the start of a stop string
        self.held = ""  # text not released yet, at most `keep` characters
        self.scanned = 0

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text that can be sent now, whether a stop string ended the output there)."""
        pending = self.held + text
        if self.stop and text:
            self.scanned += len(pending)
            cut = min((i for i in (pending.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.held = ""
                return pending[:cut], True
        split = len(pending) if final else max(len(pending) - self.keep, 0)
        self.held = pending[split:]
        return pending[:split], False


class TextStream:
    """One request's output ids -> the text to send as it grows, ending at a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] | list[str] = ()) -> None:
        self.detokenizer = Detokenizer(decode)
        self.stops = StopScanner(stop)

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """After a token was appended to `ids`: (new text to send, whether a stop string was hit)."""
        return self.stops.feed(self.detokenizer.step(ids))

    def flush(self, ids: list[int]) -> tuple[str, bool]:
        """The output ended for another reason: everything held back, up to a stop string in it."""
        return self.stops.feed(self.detokenizer.step(ids, final=True), final=True)
