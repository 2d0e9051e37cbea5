"""Test helpers for Ollama Modelfiles: a checker of the documented syntax (Ollama's docs/modelfile.mdx) and a
small evaluator of the Go template constructs lorafit writes, to render a TEMPLATE as Ollama would."""

from __future__ import annotations

import re
from pathlib import Path

INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
# the documented parameters and their value types ("Valid Parameters and Values")
PARAMETERS = {"num_ctx": int, "repeat_last_n": int, "repeat_penalty": float, "temperature": float, "seed": int,
              "stop": str, "num_predict": int, "draft_num_predict": int, "top_k": int, "top_p": float, "min_p": float}


def parse_modelfile(text: str, folder: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs; AssertionError on anything the documented format does not allow."""
    out, rest = [], text
    while rest:
        line, _, after = rest.partition("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            rest = after
            continue
        word, _, arg = line.strip().partition(" ")
        assert word.upper() in INSTRUCTIONS, f"unknown instruction {word!r}"
        if arg.startswith('"""'):  # a triple-quoted argument, possibly over several lines
            body = (arg[3:] + "\n" + after)
            assert '"""' in body, "unterminated triple-quoted argument"
            arg, _, after = body.partition('"""')
            tail, _, after = after.partition("\n")
            assert not tail.strip(), f"text after a closing triple quote: {tail!r}"
        out.append((word.upper(), arg))
        rest = after
    froms = [a for w, a in out if w == "FROM"]
    assert len(froms) == 1, "FROM is required, once"
    for word, arg in out:
        if word == "PARAMETER":
            name, _, value = arg.partition(" ")
            assert name in PARAMETERS, f"PARAMETER {name} is not a documented parameter"
            if PARAMETERS[name] is str:
                assert re.fullmatch(r'"[^"\n]*"', value), f"PARAMETER {name} {value}: a quoted string"
            else:
                PARAMETERS[name](value)
        if word in ("FROM", "ADAPTER") and (arg.startswith(("/", "./", "../")) or arg.endswith(".gguf")):
            path = Path(arg) if Path(arg).is_absolute() else folder / arg
            assert path.exists(), f"{word} {arg}: no such file (absolute, or relative to the Modelfile)"
    return out


_ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.S)


def _parse(tokens: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list, int, str]:
    """Nodes until one of `stop` (end / else); returns (nodes, next index, the stopping action)."""
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "text":
            nodes.append(("text", value))
        elif value == "end" or value == "else" or value.startswith("else if "):
            if value in stop or (value.startswith("else") and "else" in stop):
                return nodes, i, value
            raise AssertionError(f"unexpected {{{{ {value} }}}}")
        elif value.startswith("if "):
            branches, cond = [], value[3:]
            while True:
                body, i, how = _parse(tokens, i, ("end", "else"))
                branches.append((cond, body))
                if how == "end":
                    break
                cond = how[len("else if "):] if how.startswith("else if ") else "true"
            nodes.append(("if", branches))
        elif value == "range .Messages":
            body, i, how = _parse(tokens, i, ("end",))
            assert how == "end"
            nodes.append(("range", body))
        else:
            nodes.append(("value", value))
    return nodes, i, "eof"


def _cond(cond: str, data: dict, dot: dict | None) -> bool:
    if cond == "true":
        return True
    if cond == ".Messages":
        return bool(data["Messages"])
    m = re.fullmatch(r'ne \(index \.Messages 0\)\.Role "(\w+)"', cond)
    if m:
        return data["Messages"][0]["role"] != m.group(1)
    m = re.fullmatch(r'eq \.Role "(\w+)"', cond)
    if m:
        return dot["role"] == m.group(1)
    raise AssertionError(f"condition {cond!r} is outside what this evaluator (and lorafit) uses")


def _eval(nodes: list, data: dict, dot: dict | None) -> str:
    out = ""
    for kind, value in nodes:
        if kind == "text":
            out += value
        elif kind == "value":
            if value == ".Content":
                out += dot["content"]
            elif value == ".Prompt":
                out += data["Prompt"]
            elif value == '"{{"':
                out += "{{"
            else:
                raise AssertionError(f"value {value!r} is outside what this evaluator uses")
        elif kind == "if":
            for cond, body in value:
                if _cond(cond, data, dot):
                    out += _eval(body, data, dot)
                    break
        elif kind == "range":
            for message in data["Messages"]:
                out += _eval(value, data, message)
    return out


def render(template: str, messages: list[dict] | None = None, prompt: str = "") -> str:
    """The Go template rendered for Ollama's .Messages (and .Prompt)."""
    tokens, last = [], 0
    for m in _ACTION.finditer(template):
        assert "-" not in (m.group(0)[2], m.group(0)[-3]), "whitespace trimming would change the prompt text"
        tokens.append(("text", template[last:m.start()]))
        tokens.append(("action", m.group(1)))
        last = m.end()
    tokens.append(("text", template[last:]))
    nodes, i, how = _parse(tokens, 0, ())
    assert how == "eof", "unbalanced {{ end }}"
    return _eval(nodes, {"Messages": messages or [], "Prompt": prompt}, None)
