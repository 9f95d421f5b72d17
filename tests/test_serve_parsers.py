"""Tool-call and reasoning parsers of `rdnac serve` on text in each family's real output format, whole and
streamed: a stream's deltas, joined, must be the whole output's parse."""

from __future__ import annotations

import json

import pytest

from rdnac.serve import reasoning
from rdnac.serve.chat_output import ChatOutput
from rdnac.serve.protocol import APIError
from rdnac.serve.tools import (check_tools, parse_harmony, parse_hermes, parse_llama3, parse_mistral,
                               tool_format)


def _calls(parsed) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]


def accumulate(entries: list[dict]) -> list[dict]:
    """The calls of a stream's `tool_calls` delta entries, joined as a client does: each index's first entry
    carries its id, type and name; later ones only fragments of its arguments."""
    calls: list[dict] = []
    for entry in entries:
        index, function = entry["index"], entry["function"]
        if index == len(calls):
            assert entry["type"] == "function" and entry["id"].startswith("call_") and function["name"], entry
            calls.append({"name": function["name"], "arguments": ""})
        else:
            assert index < len(calls) and "id" not in entry and "name" not in function, entry
        calls[index]["arguments"] += function["arguments"]
    return calls


def test_hermes_qwen3():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')
    parsed = parse_hermes(text)
    assert parsed.content == "Let me check."
    assert _calls(parsed) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in parsed.tool_calls)
    assert parse_hermes("no call here").tool_calls == []
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_hermes(broken).content == broken and parse_hermes(broken).tool_calls == []


def test_llama3_json():
    parsed = parse_llama3('{"name": "search", "parameters": {"q": "rdnac"}}')
    assert parsed.content == "" and _calls(parsed) == [("search", {"q": "rdnac"})]
    parsed = parse_llama3('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}')
    assert _calls(parsed) == [("a", {}), ("b", {"x": 1})]
    assert parse_llama3("The answer is {x}.").content == "The answer is {x}."


def test_mistral_both_forms():
    parsed = parse_mistral('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]')
    assert parsed.content == "" and _calls(parsed) == [("add", {"a": 1, "b": 2})]
    parsed = parse_mistral('ok [TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]mul[ARGS]{"b": 2}')
    assert parsed.content == "ok" and _calls(parsed) == [("add", {"a": 1}), ("mul", {"b": 2})]


def test_harmony_channels_and_calls():
    text = ('<|channel|>analysis<|message|>User wants weather.<|end|><|start|>assistant<|channel|>commentary '
            'to=functions.get_weather <|constrain|>json<|message|>{"location": "Tokyo"}<|call|>')
    parsed = parse_harmony(text)
    assert parsed.reasoning == "User wants weather." and parsed.content == ""
    assert _calls(parsed) == [("get_weather", {"location": "Tokyo"})]
    parsed = parse_harmony("<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final"
                           "<|message|>Hello!")
    assert (parsed.reasoning, parsed.content, parsed.tool_calls) == ("think", "Hello!", [])


def test_formats_from_templates():
    assert tool_format("... <tool_call> ...") == "hermes"
    assert tool_format("... [TOOL_CALLS] ...") == "mistral"
    assert tool_format("... <|python_tag|> ...") == "llama3"
    assert tool_format("... <|channel|> ...") == "harmony"
    assert tool_format("{{ messages }}") is None


def test_think_split():
    assert reasoning.split("<think>\nplan\n</think>\n\nAnswer", is_open=False, final=True) == ("\nplan\n", "Answer")
    assert reasoning.split("plan</think>Answer", is_open=True, final=True) == ("plan", "Answer")  # R1
    assert reasoning.split("no thinking", is_open=False, final=True) == ("", "no thinking")
    assert reasoning.split("<think>cut off", is_open=False, final=True) == ("cut off", "")


class _NoTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        raise AssertionError("hermes and <think> parse the released text")


@pytest.mark.parametrize("text", [
    "<think>\nI should call it.\n</think>\n\nSure.<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": [1, 2]}}\n"
    "</tool_call>",
    "<think>only thinking</think>\n\nThe answer is 4.",
    "plain answer, no tags <tool",
])
def test_streamed_deltas_join_to_the_whole_parse(text):
    whole, _ = ChatOutput("hermes", True, False, _NoTokenizer(), set()).message(text)
    stream = ChatOutput("hermes", True, False, _NoTokenizer(), set())
    joined = {"reasoning_content": "", "content": "", "tool_calls": []}
    for end in range(1, len(text) + 1):  # one character at a time: every partial tag is seen
        delta, _ = stream.delta(text[:end], final=end == len(text))
        for key in ("reasoning_content", "content"):
            joined[key] += delta.get(key, "")
        joined["tool_calls"] += delta.get("tool_calls", [])
    assert joined["content"] == (whole["content"] or "")
    assert joined["reasoning_content"] == (whole["reasoning_content"] or "")
    assert accumulate(joined["tool_calls"]) == [c["function"] for c in whole.get("tool_calls", [])]
    assert "<think>" not in joined["content"] and "<tool_call>" not in joined["content"]


def test_tools_checked_by_name():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert check_tools([tool], "auto") == [tool] and check_tools([tool], "none") is None
    for bad, param in [([{"type": "function", "function": {"parameters": {}}}], "tools.0.function.name"),
                       ([tool, {"type": "function", "function": {"name": ""}}], "tools.1.function.name"),
                       ([{"type": "retrieval"}], "tools.0.type")]:
        with pytest.raises(APIError) as info:
            check_tools(bad, "auto")
        assert info.value.status == 400 and info.value.param == param
    assert check_tools([tool], "required") == [tool]
    assert check_tools([tool], {"type": "function", "function": {"name": "f"}}) == [tool]
    with pytest.raises(APIError) as info:
        check_tools([tool], {"type": "function", "function": {"name": "g"}})  # not one of the tools
    assert info.value.param == "tool_choice"
    with pytest.raises(APIError) as info:
        check_tools(None, "required")
    assert info.value.param == "tool_choice"


def test_harmony_streamed_by_tokens_joins_to_the_whole_parse():
    """GPT-OSS's special tokens arrive whole: stream the output token by token (specials and words)."""
    import re

    text = ('<|channel|>analysis<|message|>The user wants the weather.<|end|><|start|>assistant<|channel|>'
            'commentary to=functions.get_weather <|constrain|>json<|message|>{"location": "Tokyo"}<|call|>'
            '<|start|>assistant<|channel|>final<|message|>Checking Tokyo.')
    pieces = [p for p in re.split(r"(<\|\w+\|>|\s+)", text) if p]
    whole, has_calls = ChatOutput("harmony", False, False, _NoTokenizer(), set()).message(text)
    assert has_calls and whole["reasoning_content"] == "The user wants the weather."
    assert whole["content"] == "Checking Tokyo."
    stream = ChatOutput("harmony", False, False, _NoTokenizer(), set())
    joined, calls = {"reasoning_content": "", "content": ""}, []
    for end in range(1, len(pieces) + 1):
        delta, _ = stream.delta("".join(pieces[:end]), final=end == len(pieces))
        for key in joined:
            joined[key] += delta.get(key, "")
        calls += delta.get("tool_calls", [])
        assert "<|" not in joined["content"] and "{" not in joined["content"]
    assert joined == {"reasoning_content": whole["reasoning_content"], "content": whole["content"]}
    assert accumulate(calls) == [c["function"] for c in whole["tool_calls"]]


# (format, output, its calls' names): two calls in one answer, text before a call, every family rdnac parses
STREAMED = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}'
               '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET \\"x\\" }"}}\n</tool_call>',
     ["get_weather", "get_time"]),
    ("hermes", '<tool_call>\n{"arguments": {"q": "late name"}, "name": "search"}\n</tool_call>', ["search"]),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": "{\\"quoted\\": 1}"}\n</tool_call>', ["f"]),
    ("llama3", '<|python_tag|>{"name": "search", "parameters": {"q": "rdnac {x}"}}; '
               '{"name": "b", "parameters": {"x": 1.5}}', ["search", "b"]),
    ("llama3", '{"name": "search", "parameters": {"q": "no tag"}}', ["search"]),
    ("mistral", 'Sure. [TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": [2]}}, '
                '{"name": "mul", "arguments": {"c": "]}"}}]', ["add", "mul"]),
    ("mistral", 'ok [TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]mul[ARGS]{"b": {"c": 2}}', ["add", "mul"]),
    ("harmony", '<|channel|>analysis<|message|>Two lookups.<|end|><|start|>assistant<|channel|>commentary '
                'to=functions.get_weather <|constrain|>json<|message|>{"location": "Tokyo"}<|call|>'
                '<|start|>assistant<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>'
                '{"tz": "JST"}<|call|><|start|>assistant<|channel|>final<|message|>Done.', ["get_weather", "get_time"]),
]


def _pieces(text: str) -> list[str]:
    """Special tokens whole, everything else one character at a time (every partial JSON value is seen)."""
    import re

    return [p for s in re.split(r"(<\|\w+\|>|\[TOOL_CALLS\]|\[ARGS\])", text) if s
            for p in ([s] if re.fullmatch(r"<\|\w+\|>|\[TOOL_CALLS\]|\[ARGS\]", s) else list(s))]


@pytest.mark.parametrize("fmt, text, names", STREAMED)
def test_call_arguments_stream_as_written(fmt, text, names):
    """A call's first delta has its index, id, type and name; its arguments follow in fragments as the model
    writes them; the fragments join to the whole parse's arguments (the model's JSON text)."""
    whole, has_calls = ChatOutput(fmt, False, False, _NoTokenizer(), set()).message(text)
    assert has_calls and [c["function"]["name"] for c in whole["tool_calls"]] == names
    for call in whole["tool_calls"]:
        json.loads(call["function"]["arguments"])
    stream = ChatOutput(fmt, False, False, _NoTokenizer(), set())
    pieces, content, entries = _pieces(text), "", []
    for end in range(1, len(pieces) + 1):
        delta, _ = stream.delta("".join(pieces[:end]), final=end == len(pieces))
        content += delta.get("content", "")
        entries += delta.get("tool_calls", [])
    assert content == (whole["content"] or "")
    assert accumulate(entries) == [c["function"] for c in whole["tool_calls"]]
    for index, call in enumerate(whole["tool_calls"]):
        fragments = [e for e in entries if e["index"] == index and e["function"]["arguments"]]
        # sent once whole: arguments written before the name, and arguments quoted as a JSON string
        if '"late name"' not in text and '"quoted' not in call["function"]["arguments"]:
            assert len(fragments) > 3, fragments  # streamed as written, not sent once whole


@pytest.mark.parametrize("choice, text", [
    ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Paris"}'),
    ("required", '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]'),
])
def test_forced_call_arguments_stream_as_written(choice, text):
    whole, _ = ChatOutput(None, False, False, _NoTokenizer(), set(), forced=choice).message(text)
    stream = ChatOutput(None, False, False, _NoTokenizer(), set(), forced=choice)
    entries = []
    for end in range(1, len(text) + 1):
        entries += stream.delta(text[:end], final=end == len(text))[0].get("tool_calls", [])
    assert accumulate(entries) == [c["function"] for c in whole["tool_calls"]]
    assert [json.loads(c["function"]["arguments"]) for c in whole["tool_calls"]] == \
        ([{"city": "Paris"}] if isinstance(choice, dict) else [{"city": "Oslo"}, {}])
