"""Tool calls found in a chat output that may still be growing: what `tools.py` streams as `tool_calls` deltas.

`scan(fmt, text, final)` gives, for each call the text holds so far, its name (once the model has written
all of it) and its arguments as far as they are known. The arguments are the model's own JSON text (from
the first character of the value to its end), so the arguments known at any point are a prefix of the
arguments once the output is complete: a stream sends each call's arguments as the model writes them, and
the fragments join to the whole parse's (which takes its arguments from `scan(..., final=True)`).

The JSON is scanned, not parsed: a value's end is found by counting brackets outside strings, which works on
a prefix. Whether the whole is valid JSON is the whole parse's check (`tools.parse_*`), once it is complete.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_WS = " \t\r\n"


@dataclass
class CallState:
    name: str | None  # None while the model is still writing it
    arguments: str  # known so far; a prefix of the final arguments


def _skip(s: str, i: int, chars: str = _WS) -> int:
    while i < len(s) and s[i] in chars:
        i += 1
    return i


def value_end(s: str, i: int, final: bool) -> int | None:
    """The end of the JSON value that starts at s[i], or None if it is still arriving."""
    if s[i] in "{[\"":
        depth, is_string, j = 0, False, i
        while j < len(s):
            c = s[j]
            if is_string:
                if c == "\\":
                    j += 1
                elif c == '"':
                    is_string = False
                    if depth == 0:
                        return j + 1
            elif c == '"':
                is_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i  # a number or literal: it ends at a delimiter, or at the end of the whole text
    while j < len(s) and s[j] not in _WS + ",;:]}<[":
        j += 1
    return j if j < len(s) or final else None


def arguments_text(s: str, start: int, end: int | None) -> str:
    """A call's arguments from the value s[start:end] (end None: still arriving): objects as the model wrote
    them; a JSON string (some models quote the arguments) or a scalar only once whole."""
    raw = s[start:] if end is None else s[start:end]
    if not raw or raw[0] in "{[":
        return raw
    if end is None:
        return ""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw  # the whole parse refuses it: it stays content
    if isinstance(value, str):
        return value
    return json.dumps(value if value is not None else {}, ensure_ascii=False)


def _object(s: str, i: int, final: bool, keys: tuple[str, ...]) -> tuple[CallState | None, int | None]:
    """The call of the object at s[i] ('{'): its "name" and its arguments under the first of `keys` present;
    and the object's end (None: still arriving, or not a JSON object)."""
    fields: dict[str, tuple[int, int | None]] = {}
    j = i + 1
    end = None
    while True:
        j = _skip(s, j, _WS + ",")
        if j >= len(s) or s[j] != '"':
            end = j + 1 if j < len(s) and s[j] == "}" else None
            break
        key_end = value_end(s, j, final)
        colon = _skip(s, key_end) if key_end is not None else len(s)
        if colon >= len(s) or s[colon] != ":":
            break
        value = _skip(s, colon + 1)
        if value >= len(s):
            break
        key = s[j + 1:key_end - 1]  # the keys that matter have no escapes
        fields[key] = (value, value_end(s, value, final))
        if fields[key][1] is None:
            break
        j = fields[key][1]
    name = None
    if "name" in fields and fields["name"][1] is not None:
        try:
            name = json.loads(s[slice(*fields["name"])])
        except ValueError:
            name = None
    if not isinstance(name, str):
        return None, end
    key = next((k for k in keys if k in fields), None)
    if key is None:
        return CallState(name, ""), end
    return CallState(name, arguments_text(s, *fields[key])), end


def _objects(s: str, i: int, final: bool, keys: tuple[str, ...], separators: str) -> list[CallState]:
    """Calls of consecutive objects from s[i] (several separated by `separators`), as far as they are known."""
    calls = []
    while True:
        i = _skip(s, i, separators)
        if i >= len(s) or s[i] != "{":
            return calls
        call, end = _object(s, i, final, keys)
        if call is None:
            return calls
        calls.append(call)
        if end is None:
            return calls
        i = end


def _array(s: str, i: int, final: bool, keys: tuple[str, ...]) -> list[CallState]:
    """Calls of a JSON array of call objects at s[i] ('[')."""
    return _objects(s, i + 1, final, keys, _WS + ",")


def scan_hermes(text: str, final: bool) -> list[CallState]:
    calls = []
    for body in text.split("<tool_call>")[1:]:
        body = body.split("</tool_call>")[0]
        calls += _objects(body, 0, final, ("arguments", "parameters"), _WS + ";,")
    return calls


def scan_llama3(text: str, final: bool) -> list[CallState]:
    i = _skip(text, 0)
    if text.startswith("<|python_tag|>", i):
        i += len("<|python_tag|>")
    return _objects(text, i, final, ("parameters", "arguments"), _WS + ";,")


def scan_mistral(text: str, final: bool) -> list[CallState]:
    calls = []
    for part in text.split("[TOOL_CALLS]")[1:]:
        i = _skip(part, 0)
        if "[ARGS]" in part:  # v11+: name[ARGS]{...}; the name is whole once [ARGS] (a special token) came
            name, _, args = part.partition("[ARGS]")
            start = _skip(args, 0)
            end = value_end(args, start, final) if start < len(args) else None
            calls.append(CallState(name.strip(), arguments_text(args, start, end)))
        elif part.startswith("[", i):
            calls += _array(part, i, final, ("arguments",))
        else:
            calls += _objects(part, i, final, ("arguments",), _WS + ",")
    return calls


_PARTIAL_MARKER = re.compile(r"<(\|(\w+\|?)?)?$")  # '<', '<|', '<|ca', '<|call|' at the end of the text
HARMONY_MESSAGE = re.compile(r"(?:<\|start\|>)?(.*?)<\|message\|>(.*?)(<\|end\|>|<\|call\|>|<\|return\|>|$)", re.S)


def scan_harmony(text: str, final: bool) -> list[CallState]:
    """The body of a call message is its arguments, stripped (trailing blanks held back while it grows, and a
    marker perhaps arriving: the markers are special tokens, but a tokenizer may spell them out)."""
    calls = []
    for header, body, end in HARMONY_MESSAGE.findall(text):
        recipient = re.search(r"to=functions\.([\w.\-]+)", header)
        if recipient:
            if not end and not final:
                body = _PARTIAL_MARKER.sub("", body)
            calls.append(CallState(recipient.group(1), body.strip()))
    return calls


def scan_forced(text: str, final: bool, tool_choice) -> list[CallState]:
    """An output `tools.forced_format` constrained: a named function's arguments, or ("required") an array of
    {"name", "parameters"}."""
    if isinstance(tool_choice, dict):
        return [CallState(tool_choice["function"]["name"], text)]
    i = _skip(text, 0)
    return _array(text, i, final, ("parameters",)) if text.startswith("[", i) else []


SCANNERS = {"hermes": scan_hermes, "llama3": scan_llama3, "mistral": scan_mistral, "harmony": scan_harmony}
