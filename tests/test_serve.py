"""`rdnac serve` end to end: a real uvicorn server on a loopback port, driven by the official openai client.

The reference is a second LLM on the same plan running `LLM.generate`
one prompt at a time: greedy text served over HTTP, alone or under 32
concurrent requests, must equal it exactly.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import fastapi  # noqa: E402,F401  (installed by make: rdnac[serve])
import uvicorn  # noqa: E402,F401
import openai  # noqa: E402
import httpx  # noqa: E402

import rdnac  # noqa: E402
from rdnac import SamplingParams  # noqa: E402
from tests.support.checkpoints import make_checkpoint  # noqa: E402

MODEL = "tiny-llama"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Served:
    def __init__(self, plan: Path, reference, llm, worker, url: str):
        self.plan, self.reference, self.llm, self.worker, self.url = plan, reference, llm, worker, url
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        return parse_prometheus(httpx.get(f"{self.url}/metrics").text)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import uvicorn

    from rdnac.serve.app import create_app
    from rdnac.serve.worker import EngineWorker

    tmp = tmp_path_factory.mktemp("serve")
    make_checkpoint("llama", tmp / "ckpt")
    plan = rdnac.compile(tmp / "ckpt", target="cpu", output=tmp / "tiny.msgpack", quiet=True)
    served_llm = rdnac.load(plan)
    llm = served_llm.engine
    worker = EngineWorker(llm)
    worker.start()
    app = create_app(worker, served_llm, model_name=MODEL)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    _wait_until(lambda: server.started, 30, "uvicorn to start")
    try:
        yield Served(plan, rdnac.load(plan), llm, worker, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(10)
        worker.shutdown()


def parse_prometheus(text: str) -> dict[str, float]:
    """Every sample line must parse; returns {'name{labels}': value}."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert re.fullmatch(r"(# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+)?", line), line
            continue
        match = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_]+="[^"]*"(,[a-zA-Z_]+="[^"]*")*\})?) (\S+)', line)
        assert match, f"not a Prometheus sample line: {line!r}"
        samples[match.group(1)] = float(match.group(4))
    return samples


def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


# ---------------------------------------------------------------- happy paths

def test_health_and_models(served):
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}
    models = served.client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion_matches_engine(served):
    expected = served.reference.generate("Hello there", SamplingParams(max_tokens=8))[0]
    result = served.client.completions.create(model=MODEL, prompt="Hello there", max_tokens=8, temperature=0,
                                              logprobs=1)
    (choice,) = result.choices
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert result.usage.completion_tokens == len(expected.token_ids)
    assert len(choice.logprobs.token_logprobs) == len(expected.token_ids)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)

    # token-id prompts, and a batch of prompts in one request
    ids = served.reference.tokenizer.encode("abc")
    batch = served.client.completions.create(model=MODEL, prompt=[ids, "Hello there"], max_tokens=8, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == served.reference.generate([ids], SamplingParams(max_tokens=8))[0].text
    assert batch.choices[1].text == expected.text


def test_chat_matches_engine(served):
    expected = served.reference.generate("Hi!", SamplingParams(max_tokens=10), chat=True)[0]
    messages = [{"role": "user", "content": "Hi!"}]
    result = served.client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                                   temperature=0)
    (choice,) = result.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert result.usage.completion_tokens == len(expected.token_ids)
    legacy = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert legacy.choices[0].message.content == expected.text


def test_streaming(served):
    expected = served.reference.generate("Stream me", SamplingParams(max_tokens=12))[0]
    chunks = list(served.client.completions.create(model=MODEL, prompt="Stream me", max_tokens=12, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)

    expected = served.reference.generate("Stream chat", SamplingParams(max_tokens=12), chat=True)[0]
    chunks = list(served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Stream chat"}], max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert all(c.object == "chat.completion.chunk" for c in chunks)

    with httpx.stream("POST", f"{served.url}/v1/completions",
                      json={"prompt": "x", "max_tokens": 2, "temperature": 0, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_concurrent_requests_match_sequential(served):
    prompts = [f"Request number {i}: " + "ab" * (i % 7) for i in range(32)]
    expected = [served.reference.generate(p, SamplingParams(max_tokens=8))[0].text for p in prompts]

    def ask(prompt: str) -> str:
        return served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                                temperature=0).choices[0].text

    steps = served.llm.stats()["steps"]
    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, prompts))
    assert time.monotonic() - started < 60
    assert answers == expected
    assert served.llm.stats()["steps"] - steps < 32 * 8 // 2  # they were batched, not run one by one


# ---------------------------------------------------------------- errors

def test_request_errors(served):
    post = lambda path, **kw: httpx.post(f"{served.url}{path}", **kw)  # noqa: E731
    for path in ("/v1/completions", "/v1/chat/completions"):
        response = post(path, content=b'{"prompt": "unterminated', headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert _error(response)["type"] == "invalid_request_error"

    response = post("/v1/completions", json={"model": MODEL, "max_tokens": 4})
    assert response.status_code == 400 and _error(response)["param"] == "prompt"
    response = post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
    assert response.status_code == 400 and _error(response)["param"].startswith("messages")
    response = post("/v1/completions", json={"prompt": "x", "temperature": -1})
    assert response.status_code == 400 and _error(response)["param"] == "temperature"

    with pytest.raises(openai.BadRequestError, match="n requires at most 16") as info:  # n above the cap
        served.client.completions.create(model=MODEL, prompt="x", n=17)
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as info:  # max_tokens 0 scores the prompt: only with echo
        served.client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    assert info.value.body["param"] == "max_tokens"
    too_long = [5] * served.reference.max_model_len
    with pytest.raises(openai.BadRequestError, match="max model length"):
        served.client.completions.create(model=MODEL, prompt=too_long, max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 400}])
    with pytest.raises(openai.NotFoundError) as info:
        served.client.completions.create(model="no-such-model", prompt="x")
    assert info.value.status_code == 404 and info.value.body["code"] == "model_not_found"
    assert httpx.get(f"{served.url}/v1/nope").status_code == 404

    # one refused prompt in a batch refuses the request, and its admitted siblings are aborted
    with pytest.raises(openai.BadRequestError, match="max model length"):
        served.client.completions.create(model=MODEL, prompt=["fine", too_long], max_tokens=50)
    _wait_until(lambda: served.llm.num_free_blocks == served.llm.num_total_blocks, 20, "every KV block to be free")

    # the server still answers after all that
    assert served.client.completions.create(model=MODEL, prompt="ok", max_tokens=1).choices[0].finish_reason


def test_cancelled_requests_free_their_blocks(served):
    def idle_free_blocks() -> float | None:
        m = served.metrics()
        if m["rdnac_requests_running"] == 0 and m["rdnac_requests_waiting"] == 0:
            return m["rdnac_kv_blocks_free"]
        return None

    start = _wait_until(idle_free_blocks, 30, "the engine to go idle")
    aborted = served.metrics()['rdnac_requests_finished_total{finish_reason="abort"}']
    # 240 tokens take >= 240 decode steps: far longer than the 0.1 s client timeout below
    body = {"model": MODEL, "prompt": "never ending", "max_tokens": 240, "temperature": 0, "ignore_eos": True}

    with httpx.stream("POST", f"{served.url}/v1/completions", json={**body, "stream": True}, timeout=30) as response:
        for _ in zip(range(3), response.iter_lines()):
            pass
        assert served.llm.num_free_blocks < start  # it holds blocks while it runs
    # a non-streaming request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/completions", json=body, timeout=0.1)

    def both_aborted() -> bool:
        m = served.metrics()
        return m['rdnac_requests_finished_total{finish_reason="abort"}'] == aborted + 2
    _wait_until(both_aborted, 20, "both requests to be aborted")
    assert _wait_until(lambda: idle_free_blocks() == start, 20, "the KV blocks to be freed")
    assert served.llm.num_free_blocks == start


def test_metrics_count(served):
    before = served.metrics()
    served.client.completions.create(model=MODEL, prompt="count me", max_tokens=5, temperature=0)
    after = served.metrics()
    assert after["rdnac_prompt_tokens_total"] - before["rdnac_prompt_tokens_total"] == len(
        served.reference.tokenizer.encode("count me"))
    assert 1 <= after["rdnac_generation_tokens_total"] - before["rdnac_generation_tokens_total"] <= 5
    finished = sum(v for k, v in after.items() if k.startswith("rdnac_requests_finished_total"))
    assert after["rdnac_request_latency_seconds_count"] == finished >= 1
    assert after['rdnac_request_latency_seconds_bucket{le="+Inf"}'] == finished
    assert after["rdnac_kv_blocks_total"] == served.llm.num_total_blocks > 0
    assert 0 <= after["rdnac_kv_blocks_free"] <= after["rdnac_kv_blocks_total"]
    assert after["rdnac_preemptions_total"] >= 0


# ---------------------------------------------------------------- the CLI

def test_cli_serve_with_api_key(served):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "rdnac.cli.main", "serve", str(served.plan), "--port", str(port),
                             "--api-key", "s3cret", "--model-name", "cli-model"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False
        _wait_until(up, 60, "`rdnac serve` to start")

        denied = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            denied.models.list()
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
        assert response.status_code == 401 and _error(response)["code"] == "invalid_api_key"

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["cli-model"]
        expected = served.reference.generate("key", SamplingParams(max_tokens=4))[0].text
        assert client.completions.create(model="cli-model", prompt="key", max_tokens=4,
                                         temperature=0).choices[0].text == expected
    finally:
        proc.terminate()
        proc.wait(15)
