"""Tool calls for `rdnac serve`: `tools` checked and handed to the chat template, calls parsed from the output.

The formats of the families rdnac runs, told apart by the plan's chat template:

    hermes   Qwen2.5/Qwen3, Hermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one per call
    llama3   Llama 3.x: [<|python_tag|>]{"name": ..., "parameters": {...}} (several joined by ";")
    mistral  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...], or [TOOL_CALLS]name[ARGS]{...} (v11+)
    harmony  GPT-OSS: <|channel|>commentary to=functions.NAME ...<|message|>{...}<|call|>; its analysis
             channel is the reasoning, its final channel the content

`parse` is a pure function of the output text (decoded with special tokens where the format's markers are
special tokens: `needs_special_tokens`). A call's arguments are the model's JSON text as written
(`tool_scan.py` finds them), so a stream can send them as they come. `ToolStream` gives streaming deltas:
content before a call's marker streams as it comes; a call is sent as OpenAI does, a first `tool_calls`
delta with its index, id, type and name once the name is whole, then fragments of its arguments that join
to the whole parse's. A call whose output turns out not to parse once complete cannot be taken back; the
text is then content too (the final delta sends it).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from rdnac.serve.protocol import APIError
from rdnac.serve.tool_scan import HARMONY_MESSAGE, SCANNERS, CallState, scan_forced


@dataclass
class Parsed:
    content: str
    tool_calls: list[dict] = field(default_factory=list)
    reasoning: str | None = None  # harmony's analysis channel


def tool_format(chat_template: str | None) -> str | None:
    t = chat_template or ""
    if "<|channel|>" in t:
        return "harmony"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<tool_call>" in t:
        return "hermes"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3"
    return None


def needs_special_tokens(fmt: str | None) -> bool:
    return fmt in ("harmony", "mistral", "llama3")


def check_tools(tools: list | None, tool_choice) -> list[dict] | None:
    """The tools as the template takes them (OpenAI's {"type": "function", "function": {...}}), or None for
    tool_choice "none". A 400 naming the field for a tool without a name or a choice naming no tool."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, f"tool_choice requires tools; got tool_choice={tool_choice!r} without them",
                           param="tool_choice")
        return None
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise APIError(400, f"tools[{i}] requires type 'function'; got {_short(tool)}", param=f"tools.{i}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise APIError(400, f"tools[{i}].function requires an object with a name; got {_short(fn)}",
                           param=f"tools.{i}.function")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}].function.name requires a non-empty string; got {_short(fn.get('name'))}",
                           param=f"tools.{i}.function.name")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise APIError(400, f"tools[{i}].function.parameters requires a JSON schema object; got "
                                f"{_short(fn['parameters'])}", param=f"tools.{i}.function.parameters")
    if tool_choice == "none":
        return None
    if tool_choice not in (None, "auto", "required"):
        name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
        if name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice requires 'none', 'auto', 'required' or {{'type': 'function', "
                                f"'function': {{'name': NAME}}}} naming one of the tools; got {_short(tool_choice)}",
                           param="tool_choice")
    return list(tools)  # as given: the template renders them byte for byte as transformers would


def forced_format(tools: list[dict], tool_choice) -> dict | None:
    """The response_format that forces a call, as vLLM does: a named function's output is its arguments (its
    parameters schema); "required" is a JSON array of {"name", "parameters"}, at least one. None: not forced."""
    if tool_choice == "required":
        items = [{"type": "object", "properties": {"name": {"enum": [t["function"]["name"]]},
                                                   "parameters": t["function"].get("parameters") or {"type": "object"}},
                  "required": ["name", "parameters"]} for t in tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    elif isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        schema = next(t["function"].get("parameters") for t in tools if t["function"]["name"] == name) \
            or {"type": "object"}
    else:
        return None
    return {"type": "json_schema", "json_schema": {"name": "tool_choice", "schema": schema}}


def forced_calls(text: str, tool_choice) -> list[dict]:
    """The calls of an output that `forced_format` constrained."""
    if not isinstance(tool_choice, dict) and not _decode_objects(text):
        return []
    return [_call(c.name, c.arguments) for c in scan_forced(text, True, tool_choice) if c.name is not None]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: str) -> dict:
    return {"id": _call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _scanned(fmt: str, text: str, names: list[str]) -> list[dict] | None:
    """The calls of a complete output whose call objects named `names` (checked whole), with the arguments
    as `tool_scan` finds them (what a stream sent); None if the two disagree (then it is not a call)."""
    calls = SCANNERS[fmt](text, True)
    if [c.name for c in calls] != names:
        return None
    return [_call(c.name, c.arguments) for c in calls]


def _decode_objects(text: str) -> list | None:
    """Consecutive JSON values in text (separated by whitespace, ';' or ','), or None if it is anything else."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def _named(obj, args_key: str) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("name"), str) and args_key in obj


# ---------------------------------------------------------------- the formats

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_hermes(text: str) -> Parsed:
    start = text.find("<tool_call>")
    if start < 0:
        return Parsed(text)
    names = []
    for body in _HERMES.findall(text[start:]):
        values = _decode_objects(body)
        if not values or not all(_named(v, "arguments") or _named(v, "parameters") for v in values):
            return Parsed(text)  # not a call after all: the text stays content, as the model wrote it
        names += [v["name"] for v in values]
    calls = _scanned("hermes", text, names)
    return Parsed(text[:start].rstrip(), calls) if calls is not None else Parsed(text)


def parse_llama3(text: str) -> Parsed:
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):]
    if body.endswith("<|eom_id|>"):
        body = body[:-len("<|eom_id|>")]
    if not body.lstrip().startswith("{"):
        return Parsed(text)
    values = _decode_objects(body)
    if not values or not all(_named(v, "parameters") or _named(v, "arguments") for v in values):
        return Parsed(text)
    calls = _scanned("llama3", text, [v["name"] for v in values])
    return Parsed("", calls) if calls is not None else Parsed(text)


def parse_mistral(text: str) -> Parsed:
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        return Parsed(text)
    names = []
    for part in text[start:].split("[TOOL_CALLS]")[1:]:
        part = part.strip()
        if "[ARGS]" in part:  # v11+: name[ARGS]{...}
            name, _, args = part.partition("[ARGS]")
            values = _decode_objects(args)
            if not name.strip() or values is None or len(values) != 1:
                return Parsed(text)
            names.append(name.strip())
            continue
        values = _decode_objects(part)
        if values is None or len(values) != 1 and any(isinstance(v, list) for v in values):
            return Parsed(text)  # one array, or objects: not an array among other values
        flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
        if not flat or not all(_named(v, "arguments") for v in flat):
            return Parsed(text)
        names += [v["name"] for v in flat]
    calls = _scanned("mistral", text, names)
    return Parsed(text[:start].rstrip(), calls) if calls is not None else Parsed(text)


def parse_harmony(text: str) -> Parsed:
    """Messages of GPT-OSS's output (it starts after the prompt's `<|start|>assistant`)."""
    reasoning, content, calls = [], [], []
    for header, body, _end in HARMONY_MESSAGE.findall(text):
        channel = re.search(r"<\|channel\|>\s*(\w+)", header)
        recipient = re.search(r"to=functions\.([\w.\-]+)", header)
        if recipient:
            calls.append(_call(recipient.group(1), body.strip()))
        elif channel and channel.group(1) == "analysis":
            reasoning.append(body)
        else:
            content.append(body)
    return Parsed("".join(content), calls, "".join(reasoning) if reasoning else None)


PARSERS = {"hermes": parse_hermes, "llama3": parse_llama3, "mistral": parse_mistral, "harmony": parse_harmony}
MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}


class CallDeltas:
    """`tool_calls` delta entries of one choice, from the calls its output holds so far (`tool_scan`)."""

    def __init__(self):
        self.sent: list[tuple[str, str]] = []  # per call: its id and the arguments sent so far

    def push(self, calls: list[CallState]) -> list[dict]:
        entries = []
        for index, call in enumerate(calls):
            if call.name is None:  # calls are sent in order, each once its name is whole
                break
            if index == len(self.sent):
                self.sent.append((_call_id(), ""))
                entry = {"index": index, "id": self.sent[index][0], "type": "function",
                         "function": {"name": call.name, "arguments": ""}}
            else:
                entry = {"index": index, "function": {"arguments": ""}}
            call_id, sent = self.sent[index]
            if call.arguments.startswith(sent):  # else a call that did not parse after all: nothing to add
                entry["function"]["arguments"] = call.arguments[len(sent):]
                self.sent[index] = (call_id, call.arguments)
            if "id" in entry or entry["function"]["arguments"]:
                entries.append(entry)
        return entries


class ToolStream:
    """Streaming deltas for one choice: (content, reasoning, tool_calls) as the output text grows."""

    def __init__(self, fmt: str):
        self.fmt, self.content, self.reasoning = fmt, "", ""
        self.calls = CallDeltas()

    def _visible(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that is safe to send before the output is complete."""
        if self.fmt == "harmony":
            parsed = parse_harmony(text)
            open_call = re.search(r"to=functions\.[^<]*(<\|constrain\|>[^<]*)?<\|message\|>(?!.*<\|(call|end)\|>)"
                                  r"|to=functions\.[^<]*$", text, re.S)
            content = parsed.content if not open_call else parse_harmony(text[:open_call.start()]).content
            return parsed.reasoning or "", content
        if self.fmt == "llama3":  # the whole output is the call: nothing is content until it is known not to be
            body = text.lstrip()
            maybe_call = not body or body.startswith(("{", "<|python_tag|>")) or "<|python_tag|>".startswith(body)
            return "", "" if maybe_call else text
        marker = MARKERS[self.fmt]
        start = text.find(marker)
        if start >= 0:
            return "", text[:start].rstrip()
        for n in range(min(len(marker) - 1, len(text)), 0, -1):  # a marker perhaps arriving
            if text.endswith(marker[:n]):
                text = text[:-n]
                break
        return "", text.rstrip()  # whitespace before a call is not content: held until the next word

    def push(self, text: str, final: bool) -> tuple[str, str, list[dict]]:
        """(reasoning delta, content delta, tool_calls delta entries) for the output text so far."""
        if final:
            parsed = PARSERS[self.fmt](text)
            reasoning, content = parsed.reasoning or "", parsed.content
            calls = [CallState(c["function"]["name"], c["function"]["arguments"]) for c in parsed.tool_calls]
        else:
            (reasoning, content), calls = self._visible(text), SCANNERS[self.fmt](text, False)
        if not content.startswith(self.content):  # a held-back call turned out to be content: send the rest
            content = self.content + content[len(self.content):] if len(content) > len(self.content) else self.content
        delta = reasoning[len(self.reasoning):], content[len(self.content):]
        self.reasoning, self.content = max(reasoning, self.reasoning, key=len), max(content, self.content, key=len)
        return delta[0], delta[1], self.calls.push(calls)
