"""An Ollama Modelfile for an adapter: FROM the base, ADAPTER its GGUF LoRA, and the TEMPLATE and stop
parameters of the prompt format it was trained in (lorafit.prompt), so Ollama prompts it as training did.

Ollama's TEMPLATE is a Go template over `.Messages` (each with `.Role` and `.Content`); a chat template
is Jinja. The Go template is derived, not translated: the chat template renders a few conversations
whose contents are marker strings, and what surrounds the markers gives each role's prefix and suffix,
the text before the first message (with the default system prompt some templates insert), and the
generation prompt. Those pieces are then rendered back for other conversations and compared with the
chat template's own text; a template they cannot reproduce (one that renders a turn differently by its
place, e.g. reasoning kept only in the last turn) is refused in one line. The alpaca and text formats
are lorafit's own and written directly.

Modelfile syntax (Ollama's docs/modelfile.mdx): `INSTRUCTION arguments` lines, `#` comments, a
multi-line argument between triple quotes, `PARAMETER stop "<text>"` once per stop sequence.
BOS is not written into the template: llama.cpp adds it when the GGUF says the tokenizer does.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.errors import LorafitError
from lorafit.prompt import ALPACA, TEXT, PromptFormat, adds_bos, stop_ids

_MARK = {"system": "LORAFITMARKSYSTEMQX", "user": "LORAFITMARKUSERQX", "assistant": "LORAFITMARKASSISTANTQX",
         "user2": "LORAFITMARKUSERTWOQX"}


@dataclass(frozen=True)
class ChatPieces:
    """The text around each message of a conversation, as the chat template writes it."""

    header: str  # before the first message when it is not a system message (default system prompt included)
    system: tuple[str, str]  # (before, after) a system message that opens the conversation
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # after the last message, where the reply starts

    def render(self, messages: list[dict]) -> str:
        out = "" if messages and messages[0]["role"] == "system" else self.header
        for m in messages:
            before, after = getattr(self, m["role"])
            out += before + m["content"] + after
        return out + self.generation


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _split(text: str, mark: str, what: str) -> tuple[str, str]:
    if text.count(mark) != 1:
        raise LorafitError(f"the chat template does not write a {what} message's content once as it is; write "
                           "the Modelfile's TEMPLATE by hand")
    before, after = text.split(mark)
    return before, after


def _strip(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise LorafitError(f"the chat template renders the {what} differently by its place in the conversation; "
                           "write the Modelfile's TEMPLATE by hand")
    return text[len(prefix):]


def chat_pieces(tokenizer) -> ChatPieces:
    """The pieces of the tokenizer's chat template (module docstring), checked against its own rendering."""
    s, u, a, u2 = ({"role": r, "content": _MARK[k]} for r, k in
                   (("system", "system"), ("user", "user"), ("assistant", "assistant"), ("user", "user2")))
    try:
        lead, user_after = _split(_render(tokenizer, [u], False), _MARK["user"], "user")
        generation = _strip(_split(_render(tokenizer, [u], True), _MARK["user"], "user")[1], user_after,
                            "generation prompt")
        middle, assistant_after = _split(_split(_render(tokenizer, [u, a], False), _MARK["user"], "user")[1],
                                         _MARK["assistant"], "assistant")
        assistant_before = _strip(middle, user_after, "assistant turn")
        between = _split(_split(_render(tokenizer, [u, a, u2], True), _MARK["assistant"], "assistant")[1],
                         _MARK["user2"], "user")[0]
        user_before = _strip(between, assistant_after, "user turn")
        if not lead.endswith(user_before):
            raise LorafitError("the chat template writes the first user turn unlike the others; write the "
                               "Modelfile's TEMPLATE by hand")
        header = lead[: len(lead) - len(user_before)]
        system_lead, system_rest = _split(_render(tokenizer, [s, u], True), _MARK["system"], "system")
        system_after = _split(system_rest, _MARK["user"], "user")[0]
        if not system_after.endswith(user_before):
            raise LorafitError("the chat template writes a user turn after a system message differently; write the "
                               "Modelfile's TEMPLATE by hand")
        system_after = system_after[: len(system_after) - len(user_before)]
    except LorafitError:
        raise
    except Exception as e:  # the template itself refuses these conversations
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LorafitError(f"the chat template rejects the probe conversations ({reason}); write the Modelfile's "
                           "TEMPLATE by hand") from None
    bos = tokenizer.bos_token if adds_bos(tokenizer) else None
    pieces = ChatPieces(header, (system_lead, system_after), (user_before, user_after),
                        (assistant_before, assistant_after), generation)
    for convo in _CHECKS:  # the pieces reproduce the template's own text (BOS aside: llama.cpp adds it)
        want, got = _render(tokenizer, convo, True), pieces.render(convo)
        if bos:
            want, got = want.removeprefix(bos), got.removeprefix(bos)
        if want != got:
            raise LorafitError("the chat template renders some turns differently by their place in the conversation "
                               "(e.g. reasoning kept only in the last turn), which Ollama's TEMPLATE cannot express "
                               "from role prefixes; write the Modelfile's TEMPLATE by hand")
    if bos:  # a template that writes BOS itself: leave it to llama.cpp
        pieces = ChatPieces(pieces.header.removeprefix(bos), (pieces.system[0].removeprefix(bos), pieces.system[1]),
                            pieces.user, pieces.assistant, pieces.generation)
    return pieces


_CHECKS = [
    [{"role": "user", "content": "Hi there.\nTwo lines."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"}, {"role": "user", "content": "d"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


def _literal(text: str) -> str:
    """Text as a Go template writes it verbatim ("{{" is the only thing it would read as an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(pieces: ChatPieces) -> str:
    """`pieces` as a Go template over Ollama's .Messages (no whitespace trimming: the text is exact)."""
    def role(name: str) -> str:
        before, after = getattr(pieces, name)
        return f'eq .Role "{name}" }}}}{_literal(before)}{{{{ .Content }}}}{_literal(after)}'
    header = _literal(pieces.header)
    return (f'{{{{ if .Messages }}}}{{{{ if ne (index .Messages 0).Role "system" }}}}{header}{{{{ end }}}}'
            f'{{{{ else }}}}{header}{{{{ end }}}}'
            f'{{{{ range .Messages }}}}{{{{ if {role("system")}{{{{ else if {role("user")}'
            f'{{{{ else if {role("assistant")}{{{{ end }}}}{{{{ end }}}}{_literal(pieces.generation)}')


def alpaca_pieces(fmt: PromptFormat, eos: str) -> ChatPieces:
    """lorafit's instruction format as pieces (lorafit.prompt: replies end with EOS)."""
    def around(piece: str) -> tuple[str, str]:
        before, _, after = piece.partition("{content}")
        return before, after
    return ChatPieces("", around(fmt.system), around(fmt.instruction), (fmt.response, eos), fmt.response)


def template_and_stops(tokenizer, fmt: PromptFormat) -> tuple[str, list[str]]:
    """(the TEMPLATE, the stop strings) of an adapter trained in `fmt` on `tokenizer`."""
    stops = sorted({tokenizer.convert_ids_to_tokens(i) for i in stop_ids(tokenizer)})
    if fmt.kind == TEXT:
        return "{{ .Prompt }}", stops
    pieces = alpaca_pieces(fmt, tokenizer.eos_token or "") if fmt.kind == ALPACA else chat_pieces(tokenizer)
    return go_template(pieces), stops


def modelfile(base: str, adapter_gguf: str, template: str, stops: list[str], note: str = "") -> str:
    """The Modelfile's text (Ollama's documented instructions only: FROM, ADAPTER, TEMPLATE, PARAMETER)."""
    if '"""' in template:
        raise LorafitError('the prompt template contains """, which a Modelfile cannot quote; write it by hand')
    bad = [s for s in stops if '"' in s or "\n" in s]
    if bad:
        raise LorafitError(f"stop token {bad[0]!r} cannot be written as a Modelfile string; write it by hand")
    lines = [f"# {line}" for line in note.splitlines()] + [
        f"FROM {base}", f"ADAPTER {adapter_gguf}", f'TEMPLATE """{template}"""',
        *(f'PARAMETER stop "{s}"' for s in stops)]
    return "\n".join(lines) + "\n"
