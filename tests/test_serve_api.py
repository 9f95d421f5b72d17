"""The OpenAI API parts clients and evaluation harnesses use, over a real `rdnac serve` on loopback.

References: the plan's own logits (`LLM.logits`, every position) for prompt and top logprobs, a greedy
loop over those logits for penalties and biases, transformers' `apply_chat_template(..., tools=...)` for
rendering tools with a real-format Qwen3 template, and `jsonschema` for structured output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.serve.protocol import choice_seed
from tests.support.cases import tiny_llama_plan
from tests.support.checkpoints import make_checkpoint
from tests.test_serve import MODEL, _error
from tests.test_serve_hardening import serving

QWEN3_TEMPLATE = (Path(__file__).parent / "support" / "qwen3_chat_template.jinja").read_text()


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return tiny_llama_plan(tmp_path_factory.mktemp("serve_api"))


@pytest.fixture(scope="module")
def reference(plan):
    return rdnac.load(plan)


@pytest.fixture(scope="module")
def url(plan):
    with serving(rdnac.load(plan), max_n=10) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120)


# ---------------------------------------------------------------- item 3: the OpenAI API in full

def test_loglikelihood_request_scores_the_prompt(client, reference):
    """lm-eval's loglikelihood: echo + logprobs, max_tokens 0: each prompt token's logprob given its prefix."""
    context, continuation = "The quick brown", " fox"
    ids = reference.tokenizer.encode(context + continuation)
    result = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=5, max_tokens=0, temperature=0)
    (choice,) = result.choices
    expected = reference.logits(ids)[:-1].log_softmax(-1)  # [T - 1, V]
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[1:] == pytest.approx(expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist(),
                                                  abs=1e-4)
    values, top_ids = expected.topk(5, dim=-1)
    for ours, v, i in zip(lp.top_logprobs[1:], values.tolist(), top_ids.tolist()):
        # OpenAI's legacy shape is {token string: logprob}: byte tokens that decode alike merge, the last wins
        theirs = dict((reference.tokenizer.decode([t], skip_special_tokens=False), x) for t, x in zip(i, v))
        assert list(ours) == list(theirs)
        assert list(ours.values()) == pytest.approx(list(theirs.values()), abs=1e-4)
    assert choice.text == reference.tokenizer.decode(ids, skip_special_tokens=False)
    assert result.usage.prompt_tokens == len(ids) and result.usage.completion_tokens == 0
    # echo with a completion: the prompt's entries, then the completion's as generated
    gen = reference.generate([ids], SamplingParams(max_tokens=4, logprobs=True))[0]
    both = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=0, max_tokens=4, temperature=0)
    assert both.choices[0].text == choice.text + gen.text
    assert both.choices[0].logprobs.token_logprobs[len(ids):] == pytest.approx(gen.logprobs, abs=1e-5)
    assert both.choices[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)


def test_n_choices_are_distinct_and_seeded(client, reference):
    def ask(seed):
        return [c.text for c in client.completions.create(model=MODEL, prompt="Once", n=3, max_tokens=12,
                                                           temperature=1.0, seed=seed).choices]
    first = ask(7)
    assert len(set(first)) == 3, first
    assert ask(7) == first
    assert ask(8) != first
    # each choice is the engine's generation with its derived seed
    expected = reference.generate(["Once"] * 3, [SamplingParams(max_tokens=12, temperature=1.0,
                                                                seed=choice_seed(7, j)) for j in range(3)])
    assert first == [o.text for o in expected]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=3,
                                          max_tokens=8, temperature=1.0, seed=3)
    assert [c.index for c in chat.choices] == [0, 1, 2] and len({c.message.content for c in chat.choices}) == 3


def test_n_choices_share_the_prefill(plan, client, reference):
    """With prefix caching on, choices 1..n-1 wait for choice 0's prefill and reuse its full prompt blocks:
    the prompt is computed once, the answers are those of separate requests."""
    prompt = reference.tokenizer.encode("A longer prompt, so that it fills a few whole KV blocks: " * 2)
    body = {"prompt": prompt, "n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 11}
    expected = [c["text"] for c in _post_json(client, body)["choices"]]
    llm = rdnac.load(plan, enable_prefix_caching=True)
    block = llm.engine.block_size
    with serving(llm) as url:
        before = llm.engine.stats()["prefix_cache_hit_tokens"]
        response = _post(url, "/v1/completions", body)
        hits = llm.engine.stats()["prefix_cache_hit_tokens"] - before
    assert [c["text"] for c in response.json()["choices"]] == expected
    assert response.json()["usage"]["prompt_tokens"] == len(prompt)  # the prompt counted once, as OpenAI does
    assert hits == 2 * ((len(prompt) - 1) // block * block), (hits, len(prompt), block)


def test_top_logprobs_match_the_plans_logits(client, reference):
    messages = [{"role": "user", "content": "Hi"}]
    prompt = reference.encode_prompt(messages)
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=5)
    content = result.choices[0].logprobs.content
    generated = reference.generate([prompt], SamplingParams(max_tokens=5))[0].token_ids
    expected = reference.logits(prompt + generated[:-1])[len(prompt) - 1:].log_softmax(-1)  # [N, V]
    values, ids = expected.topk(5, dim=-1)
    for entry, v, i in zip(content, values.tolist(), ids.tolist()):
        assert [a.token for a in entry.top_logprobs] == [reference.tokenizer.decode([t], skip_special_tokens=False)
                                                        for t in i]
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(v, abs=1e-4)


def _greedy(reference, prompt: list[int], steps: int, adjust) -> list[int]:
    """Greedy tokens from the plan's logits, each step's logits [V] adjusted by adjust(logits, generated)."""
    out = []
    for _ in range(steps):
        logits = reference.logits(prompt + out)[-1]
        out.append(int(adjust(logits, out).argmax()))
    return out


def test_penalties_bias_and_min_tokens(client, reference):
    prompt = reference.tokenizer.encode("Hello there")

    def penalized(logits, out):
        counts = torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=logits.shape[0]).float()
        return logits - 1.5 * counts - 0.5 * (counts > 0).float()
    expected = _greedy(reference, prompt, 6, penalized)
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                       frequency_penalty=1.5, presence_penalty=0.5, logprobs=0)
    assert result.choices[0].text == reference.tokenizer.decode(expected)
    assert result.choices[0].logprobs.tokens == [reference.tokenizer.decode([t], skip_special_tokens=False)
                                                 for t in expected]
    # logit_bias: +100 on one token makes it every greedy choice
    token = reference.tokenizer.encode("z")[0]
    biased = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                       logit_bias={str(token): 100})
    assert biased.choices[0].text == "zzzz"
    # min_tokens: EOS (biased to win) cannot end the request before 3 tokens; stop_token_ids ends it
    eos = min(reference.tokenizer.eos_token_ids)
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "logit_bias": {str(eos): 100}}
    assert _post_json(client, body)["usage"]["completion_tokens"] == 1
    assert _post_json(client, {**body, "min_tokens": 3})["usage"]["completion_tokens"] == 4  # 3 + EOS
    stopped = _post_json(client, {"prompt": prompt, "max_tokens": 10, "temperature": 0,
                                  "logit_bias": {str(token): 100}, "stop_token_ids": [token]})
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["finish_reason"] == "stop"
    ignored = _post_json(client, {**body, "ignore_eos": True, "max_tokens": 3})
    assert ignored["usage"]["completion_tokens"] == 3 and ignored["choices"][0]["finish_reason"] == "length"


def _post_json(client, body: dict) -> dict:
    response = httpx.post(f"{client.base_url}completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_role_chunk_comes_with_the_first_token(url, reference):
    body = {"messages": [{"role": "user", "content": "Stream"}], "max_tokens": 4, "temperature": 0,
            "stream": True, "logprobs": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
    first = events[0]["choices"][0]
    assert first["delta"]["role"] == "assistant"
    assert len(first["logprobs"]["content"]) == 1  # it carries the first token: sent once prefill is done
    assert sum(1 for e in events if "role" in e["choices"][0]["delta"]) == 1


# ---------------------------------------------------------------- item 5: structured output

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "enum": ["ada", "bob", "eve"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "ok", "tags"], "additionalProperties": False}


def test_json_schema_responses_always_validate(url):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar")
    texts = []
    for seed in range(5):  # 5 requests x n=10: 50 sampled answers at temperature 1.0
        body = {"messages": [{"role": "user", "content": "Describe someone."}], "max_tokens": 120,
                "temperature": 1.0, "seed": seed, "n": 10,
                "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}
        response = _post(url, "/v1/chat/completions", body)
        assert response.status_code == 200, response.text
        texts += [c["message"]["content"] for c in response.json()["choices"]]
    assert len(texts) == 50
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 10  # sampled, not one answer
    response = _post(url, "/v1/completions", {"prompt": "x", "max_tokens": 60, "temperature": 1.0, "seed": 1,
                                              "response_format": {"type": "json_object"}})
    (choice,) = response.json()["choices"]
    assert choice["finish_reason"] == "stop" and isinstance(json.loads(choice["text"]), dict), choice


def test_bad_input_gets_400_naming_the_field(url, monkeypatch):
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    cases = [({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
                "type": "object", "properties": {"a": {"type": "integr"}}}}}}, "response_format.json_schema.schema"),
             ({"response_format": {"type": "yaml"}}, "response_format.type"),
             ({"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]},
              "tools.0.function.name"),
             ({"n": 11}, "n")]
    for extra, param in cases:
        response = _post(url, "/v1/chat/completions", {**chat, **extra})
        assert response.status_code == 400, response.text
        error = _error(response)
        assert error["param"] == param, error
        assert "\n" not in error["message"]
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # the library not installed: a 400 saying how to get it
    response = _post(url, "/v1/chat/completions", {**chat, "response_format": {"type": "json_object"}})
    assert response.status_code == 400 and "rdnac[structured]" in _error(response)["message"]
    assert _error(response)["param"] == "response_format"


# ---------------------------------------------------------------- item 4: tools and reasoning on Qwen3

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny random Qwen3 with the real Qwen3 chat template; its tokenizer has Qwen3's added (non-special)
    tokens for thinking and tool calls."""
    from tokenizers import Tokenizer

    tmp = tmp_path_factory.mktemp("qwen3")
    make_checkpoint("qwen3", tmp / "ckpt", max_position_embeddings=1024)  # tools in a byte tokenizer: ~600
    tok = Tokenizer.from_file(str(tmp / "ckpt" / "tokenizer.json"))
    tok.add_tokens(["<think>", "</think>", "<tool_call>", "</tool_call>"])
    tok.save(str(tmp / "ckpt" / "tokenizer.json"))
    config = json.loads((tmp / "ckpt" / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN3_TEMPLATE
    (tmp / "ckpt" / "tokenizer_config.json").write_text(json.dumps(config))
    plan = rdnac.compile(tmp / "ckpt", target="cpu", output=tmp / "qwen3.msgpack", quiet=True)
    llm = rdnac.load(plan)
    with serving(llm) as url:
        yield tmp / "ckpt", llm, url


def test_tools_render_as_transformers_does(qwen3):
    from transformers import AutoTokenizer

    ckpt, llm, url = qwen3
    hf = AutoTokenizer.from_pretrained(ckpt)
    conversations = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}],
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
             "name": "get_weather", "arguments": {"city": "Paris"}}}]},
         {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]]
    for messages in conversations:
        for kwargs in ({}, {"enable_thinking": False}):
            expected = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True,
                                              **kwargs)
            body = {"messages": messages, "tools": TOOLS, "max_tokens": 1, "temperature": 0}
            if kwargs:
                body["chat_template_kwargs"] = kwargs
            response = _post(url, "/v1/chat/completions", body)
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["prompt_tokens"] == len(hf(expected, add_special_tokens=False).input_ids)
            # the served prompt is the tokenizer's rendering (what _Server.render_chat calls), token for token
            assert llm.tokenizer.apply_chat_template(messages, True, TOOLS, **kwargs) == expected
    assert "<tools>" in expected and '"name": "get_weather"' in expected


# The model is driven to a fixed output through the real engine and sampler with a regex grammar (vLLM's
# structured-output extension): the random weights pick nothing, the parsing path is the served one.
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _regex(text: str) -> dict:
    """A regex matching exactly `text` (only the metacharacters escaped: xgrammar's regex syntax is ECMAScript's)."""
    return {"type": "regex", "regex": "".join("\\" + c if c in r".^$*+?{}[]\|()/" else c for c in text)}


def test_tool_call_parsed_whole_and_streamed(qwen3):
    pytest.importorskip("xgrammar")
    _, llm, url = qwen3
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    extra = {"response_format": _regex("Checking.\n" + CALL)}
    result = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=200,
                                            temperature=1.0, seed=0, extra_body=extra)
    (choice,) = result.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=200,
                                                 temperature=1.0, seed=0, stream=True, extra_body=extra))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "Checking."
    # the first delta of a call names it; its arguments come in fragments after (test_serve_tool_stream)
    assert {tc.index for tc in calls} == {0} and calls[0].id.startswith("call_") and calls[0].type == "function"
    assert [tc.function.name for tc in calls if tc.function.name] == ["get_weather"]
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert "".join(tc.function.arguments or "" for tc in calls) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # without tools in the request, the same text is content
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=200, temperature=1.0,
                                           seed=0, extra_body=extra)
    assert plain.choices[0].message.content == "Checking.\n" + CALL and not plain.choices[0].message.tool_calls


def test_think_lands_in_reasoning_content(qwen3):
    pytest.importorskip("xgrammar")
    _, llm, url = qwen3
    messages = [{"role": "user", "content": "2+2?"}]
    body = {"messages": messages, "max_tokens": 200, "temperature": 0,
            "response_format": _regex("<think>\nadd them\n</think>\n\nIt is 4.")}
    message = _post(url, "/v1/chat/completions", body).json()["choices"][0]["message"]
    assert message["reasoning_content"].strip() == "add them" and message["content"] == "It is 4."
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas).strip() == "add them"
    assert "".join(d.get("content") or "" for d in deltas) == "It is 4."
    # enable_thinking false: the template closes the block; the output is all content
    no_think = _post(url, "/v1/chat/completions", {**body, "chat_template_kwargs": {"enable_thinking": False},
                                                   "response_format": _regex("Four.")}).json()
    assert no_think["choices"][0]["message"]["content"] == "Four."
    assert no_think["choices"][0]["message"]["reasoning_content"] is None


def test_forced_tool_choice_constrains_the_output_to_a_call(qwen3):
    """tool_choice "required" or a named function: the grammar forces a call (vLLM's way), at temperature 1."""
    pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    _, llm, url = qwen3
    city = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
            "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": city}},
             {"type": "function", "function": {"name": "get_time", "parameters": {
                 "type": "object", "properties": {}, "additionalProperties": False}}}]
    messages = [{"role": "user", "content": "Weather?"}]
    for choice_, names in (({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
                           ("required", {"get_weather", "get_time"})):
        for seed in range(3):
            body = {"messages": messages, "tools": tools, "tool_choice": choice_, "max_tokens": 200,
                    "temperature": 1.0, "seed": seed}
            response = _post(url, "/v1/chat/completions", body)
            assert response.status_code == 200, response.text
            (choice,) = response.json()["choices"]
            assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
            assert choice["message"]["tool_calls"]
            for call in choice["message"]["tool_calls"]:
                assert call["function"]["name"] in names
                schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] ==
                              call["function"]["name"])
                jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    response = _post(url, "/v1/chat/completions", {"messages": messages, "tools": tools, "tool_choice": "required",
                                                   "response_format": {"type": "json_object"}})
    assert response.status_code == 400 and _error(response)["param"] == "response_format"


def test_chat_template_file_replaces_the_plans(plan, tmp_path):
    import subprocess

    from tests.test_serve_hardening import ROOT, serve_process

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<<{{ m.content }}>>{% endfor %}")
    with serve_process(plan, "--chat-template", str(template)) as (_, url):
        body = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 1}).json()
        assert body["usage"]["prompt_tokens"] == len("<<hi>>")  # one byte a token
    template.write_text("{% for m in messages %}")
    result = subprocess.run([sys.executable, "-m", "rdnac.cli.main", "serve", str(plan), "--chat-template",
                             str(template), "--port", "1"], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0 and "--chat-template requires a Jinja chat template that renders" in result.stderr


def test_sampling_params_check_the_new_fields():
    from rdnac.errors import RequestError

    for kwargs, name in [({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
                         ({"logit_bias": {-1: 1.0}}, "logit_bias"), ({"logit_bias": {5: 101}}, "logit_bias"),
                         ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"), ({"guide": "json"}, "guide")]:
        with pytest.raises(RequestError, match=f"^{name} requires"):
            SamplingParams(**kwargs)


def test_deferred_choices_abort_and_outlive_their_leader(plan):
    """Engine level: a choice waiting for its leader's prefill can be aborted (it holds no blocks), and one
    whose leader is aborted runs on its own."""
    llm = rdnac.load(plan, enable_prefix_caching=True)
    engine = llm.engine
    ids = llm.tokenizer.encode("a prompt of a few blocks, shared by its choices " * 2)
    params = SamplingParams(max_tokens=3)
    engine.add_request("lead", ids, params)
    engine.add_request("child-1", ids, params, prefill_after="lead")
    engine.add_request("child-2", ids, params, prefill_after="lead")
    assert engine.stats()["waiting"] == 3
    engine.abort_request("child-1")
    engine.abort_request("lead")
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert finished == {"child-1": "abort", "lead": "abort", "child-2": "length"}
    assert engine.num_free_blocks == engine.num_total_blocks


def test_streamed_echo_and_n_match_the_whole_response(url):
    body = {"prompt": "Hello", "max_tokens": 5, "temperature": 1.0, "seed": 5, "n": 2, "echo": True, "logprobs": 2}
    whole = _post(url, "/v1/completions", body).json()
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=stream, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
    for choice in whole["choices"]:
        parts = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == choice["index"]]
        assert parts[0]["text"] == "Hello"  # the echo comes first
        assert "".join(p["text"] for p in parts) == choice["text"]
        streamed = sum((p["logprobs"]["token_logprobs"] for p in parts if p["logprobs"]), [])
        assert streamed == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-6)
    assert events[-1]["usage"] == whole["usage"] and whole["usage"]["prompt_tokens"] == len("Hello")
    assert whole["choices"][0]["text"] != whole["choices"][1]["text"]
