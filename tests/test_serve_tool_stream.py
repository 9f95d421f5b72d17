"""Tool calls streamed by a real `rdnac serve` on loopback to the official `openai` client, for every tool-call
format rdnac parses: the accumulated `tool_calls` deltas (first the index, id, type and name; then argument
fragments as the model writes them) must equal the same request's non-streamed parse.

The model is driven to a fixed output through the real engine and sampler with a regex grammar (vLLM's
structured-output extension, as in test_serve_api); the server's chat template picks the format.
"""

from __future__ import annotations

import json

import openai
import pytest

import rdnac
from tests.support.checkpoints import make_checkpoint
from tests.test_serve import MODEL
from tests.test_serve_api import _regex
from tests.test_serve_hardening import serving
from tests.test_serve_parsers import accumulate

pytest.importorskip("xgrammar")

# Each template renders the conversation plainly; its source names the format's marker, which is how the
# server tells the format (tools.tool_format), as the families' real templates do.
TEMPLATE = ("{#- MARKER #}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if tools %}tools: {{ tools | length }}\n{% endif %}assistant: ")

OUTPUTS = {  # format -> (its template's marker, an output with text or reasoning before two calls)
    "hermes": ("<tool_call>", 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n'
                              '</tool_call>'),
    "llama3": ("<|python_tag|>", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                                 '{"name": "get_time", "parameters": {"tz": "CET"}}'),
    "mistral": ("[TOOL_CALLS]", 'Checking. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                                '{"name": "get_time", "arguments": {"tz": "CET"}}]'),
    "harmony": ("<|channel|>", '<|channel|>analysis<|message|>Two lookups.<|end|><|start|>assistant<|channel|>'
                               'commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
                               '<|call|><|start|>assistant<|channel|>commentary to=functions.get_time '
                               '<|constrain|>json<|message|>{"tz": "CET"}<|call|>'),
}
CONTENT = {"hermes": "Checking.", "llama3": None, "mistral": "Checking.", "harmony": None}

TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {
    key: {"type": "string"}}}}} for name, key in (("get_weather", "city"), ("get_time", "tz"))]


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tool_stream")
    make_checkpoint("llama", tmp / "ckpt", max_position_embeddings=512)
    return rdnac.compile(tmp / "ckpt", target="cpu", output=tmp / "tiny.msgpack", quiet=True)


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_streamed_tool_calls_join_to_the_whole_parse(plan, fmt):
    marker, output = OUTPUTS[fmt]
    with serving(rdnac.load(plan), chat_template=TEMPLATE.replace("MARKER", marker)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        request = dict(model=MODEL, messages=[{"role": "user", "content": "Weather and time in Paris?"}],
                       tools=TOOLS, max_tokens=300, temperature=1.0, seed=0,
                       extra_body={"response_format": _regex(output)})
        (whole,) = client.chat.completions.create(**request).choices
        chunks = list(client.chat.completions.create(**request, stream=True))
    assert whole.finish_reason == "tool_calls"
    assert whole.message.content == CONTENT[fmt]
    expected = [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls]
    assert [(c["name"], json.loads(c["arguments"])) for c in expected] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert all(c.type == "function" and c.id.startswith("call_") for c in whole.message.tool_calls)

    deltas = [c.choices[0].delta for c in chunks if c.choices]
    entries = [tc.model_dump(exclude_none=True) for d in deltas for tc in (d.tool_calls or [])]
    for entry in entries:  # the client's model has every field; absent ones come back as None, dropped above
        entry["function"].setdefault("arguments", "")
    assert accumulate(entries) == expected
    for index in (0, 1):  # the arguments came as the model wrote them, not once whole
        assert len([e for e in entries if e["index"] == index and e["function"]["arguments"]]) > 3
    assert "".join(d.content or "" for d in deltas) == (CONTENT[fmt] or "")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    if fmt == "harmony":
        assert whole.message.model_extra["reasoning_content"] == "Two lookups."
