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
    assert [c["function"] for c in joined["tool_calls"]] == [c["function"] for c in whole.get("tool_calls", [])]
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
    assert [c["function"] for c in calls] == [c["function"] for c in whole["tool_calls"]]
