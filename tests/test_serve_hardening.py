"""`rdnac serve` under bad input and faults (issue 23, server part), over real HTTP servers on loopback.

Each test names the item it covers. The references: `LLM.generate` on the same
plan for answers, `rdnac run` for sampling defaults, and the server's own
serial answers for the soak (tests/test_serve_soak.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

import rdnac
from rdnac import SamplingParams
from rdnac.cli.main import cli
from rdnac.errors import RequestError
from tests.support.cases import tiny_llama_plan
from tests.support.checkpoints import make_checkpoint
from tests.test_serve import MODEL, _error, _free_port, _wait_until, parse_prometheus

ROOT = Path(__file__).resolve().parents[1]
POISON = [17, 4, 17, 4, 99, 17]  # a prompt the injected fault recognises


@contextmanager
def serving(llm, **app_options):
    """A uvicorn server in this process over a started EngineWorker of `llm`; yields its URL."""
    import uvicorn

    from rdnac.serve.app import create_app
    from rdnac.serve.worker import EngineWorker

    worker = EngineWorker(llm.engine)
    worker.start()
    app = create_app(worker, llm, model_name=MODEL, **app_options)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    _wait_until(lambda: server.started, 30, "uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        worker.shutdown()


@contextmanager
def serve_process(plan: Path, *args: str, env: dict | None = None, log_path: Path | None = None,
                  main: tuple[str, ...] = ("-m", "rdnac.cli.main")):
    """`rdnac serve PLAN ARGS` as a subprocess on a free port; yields (process, url) once /health answers.
    Its output goes to a file (a pipe nobody reads would fill with access logs and block the server):
    `log_path`, or a temporary one. `main`: the Python arguments that run the CLI."""
    import tempfile

    port = _free_port()
    with (open(log_path, "w+") if log_path is not None else tempfile.TemporaryFile("w+")) as log:
        proc = subprocess.Popen([sys.executable, *main, "serve", str(plan), "--port", str(port),
                                 *args], env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"`rdnac serve` exited with {proc.returncode}: {log.read()[-4000:]}")
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False
        try:
            _wait_until(up, 90, "`rdnac serve` to start")
            yield proc, url
        finally:
            proc.terminate()
            proc.wait(15)


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return tiny_llama_plan(tmp_path_factory.mktemp("hardening"))


@pytest.fixture(scope="module")
def reference(plan):
    return rdnac.load(plan)


@pytest.fixture(scope="module")
def llm(plan):
    return rdnac.load(plan)


@pytest.fixture(scope="module")
def url(llm):
    with serving(llm, max_body_bytes=1 << 20) as url:
        yield url


def _post(url: str, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60, **kwargs)


def _metrics(url: str) -> dict[str, float]:
    return parse_prometheus(httpx.get(f"{url}/metrics").text)


def _all_blocks_free(url: str) -> bool:
    m = _metrics(url)
    return (m["rdnac_requests_running"] == m["rdnac_requests_waiting"] == 0
            and m["rdnac_kv_blocks_free"] == m["rdnac_kv_blocks_total"] > 0)


def _one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message


# ---------------------------------------------------------------- 1. seeds, and one failing request

def test_seeds_outside_openai_range_get_400(url, reference):
    for seed in (1 << 63, 1 << 64, -(1 << 63) - 1, 10 ** 40):
        for path, body in (("/v1/completions", {"prompt": "x"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            response = _post(url, path, {**body, "max_tokens": 2, "seed": seed})
            assert response.status_code == 400, response.text
            error = _error(response)
            assert error["param"] == "seed" and "2**63" in error["message"]
            _one_line(error["message"])
    for seed in ((1 << 63) - 1, -(1 << 63)):  # the ends of the range are served, with the sampler's tokens
        params = SamplingParams(max_tokens=6, temperature=0.9, seed=seed, ignore_eos=True)
        expected = reference.generate("seeded", params)[0].text
        response = _post(url, "/v1/completions", {"prompt": "seeded", "max_tokens": 6, "temperature": 0.9,
                                                  "seed": seed, "ignore_eos": True})
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected
    assert httpx.get(f"{url}/health").status_code == 200


def test_sampling_params_refuse_seeds_wider_than_64_bits():
    for seed in (1 << 64, -(1 << 63) - 1, 1 << 100, 10 ** 5000):
        with pytest.raises(RequestError, match=r"seed requires None or an integer in \[-2\*\*63, 2\*\*64 - 1\]"):
            SamplingParams(seed=seed)
    for seed in (-(1 << 63), -1, 0, (1 << 64) - 1):
        assert SamplingParams(seed=seed).seed == seed


def _poison(monkeypatch, llm) -> list[int]:
    """Make the runner raise whenever a step holds the POISON prompt; returns the sizes of the failed steps.
    (An injected fault, not a stand-in: every other step runs the real runner.)"""
    runner, execute, failed = llm.engine.runner, llm.engine.runner.execute, []

    def faulty(entries, *args, **kwargs):
        if any(e.token_ids[:len(POISON)] == POISON for e in entries):
            failed.append(len(entries))
            raise RuntimeError("injected fault")
        return execute(entries, *args, **kwargs)
    monkeypatch.setattr(runner, "execute", faulty)
    return failed


def test_engine_failure_fails_that_request_only(monkeypatch, reference):
    prompts = [[5, 6, 7, 8], [40, 41], [9] * 12]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    expected = [reference.generate([p], params)[0] for p in prompts]
    failed = _poison(monkeypatch, reference)
    engine = reference.engine
    for i, p in enumerate(prompts[:2]):
        engine.add_request(f"ok-{i}", p, params)
    engine.add_request("bad", POISON + [3], params)
    engine.add_request("ok-2", prompts[2], params)
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert max(failed) == 4, failed  # the fault hit a step shared with the three others
    assert final["bad"].finish_reason == "error" and str(final["bad"].error) == "injected fault"
    for i, e in enumerate(expected):
        assert final[f"ok-{i}"].token_ids == e.token_ids and final[f"ok-{i}"].finish_reason == "length"
    assert engine.num_free_blocks == engine.num_total_blocks

    # the Python API raises the failure itself, once the rest has run
    with pytest.raises(RuntimeError, match="injected fault"):
        reference.generate([prompts[0], POISON], params)
    assert not engine.has_unfinished() and engine.num_free_blocks == engine.num_total_blocks
    assert reference.generate([prompts[1]], params)[0].token_ids == expected[1].token_ids


def test_server_failure_fails_that_request_only(monkeypatch, url, llm, reference):
    prompts = [f"neighbour {i}" for i in range(6)]
    expected = [reference.generate(p, SamplingParams(max_tokens=12))[0].text for p in prompts]
    before = _metrics(url)
    failed = _poison(monkeypatch, llm)

    def ask(job):
        kind, prompt = job
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
        if kind == "stream":
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                return r.status_code, [line for line in r.iter_lines() if line]
        response = _post(url, "/v1/completions", body)
        return response.status_code, response.json()

    jobs = [("plain", POISON), ("stream", POISON + [5])] + [("plain", p) for p in prompts]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(ask, jobs))
    assert failed, "the fault was never hit"
    (status, body), (stream_status, lines) = results[:2]
    assert status == 500 and body["error"]["type"] == "server_error" and "injected fault" in body["error"]["message"]
    _one_line(body["error"]["message"])
    assert stream_status == 200 and lines[-1] == "data: [DONE]"
    assert "injected fault" in json.loads(lines[-2][len("data: "):])["error"]["message"]
    assert [r[1]["choices"][0]["text"] for r in results[2:]] == expected
    assert all(r[0] == 200 for r in results[2:])

    # the engine keeps serving: health, a later request, every block back, two failures counted
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert _post(url, "/v1/completions", {"prompt": prompts[0], "max_tokens": 12,
                                          "temperature": 0}).json()["choices"][0]["text"] == expected[0]
    _wait_until(lambda: _all_blocks_free(url), 20, "every KV block to be free")
    after = _metrics(url)
    key = 'rdnac_requests_finished_total{finish_reason="error"}'
    assert after[key] - before.get(key, 0) == 2


def test_engine_failing_for_good_fails_every_request_and_refuses_more(monkeypatch, reference):
    """A fault in every step (a lost GPU): the step fails, its one-token probe fails too, the engine says why,
    every request in flight fails with that reason, none is taken again, and every block is back."""
    from rdnac.errors import EngineError

    engine = reference.engine
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    for i, p in enumerate(([5, 6, 7], [8, 9], [10] * 20)):
        engine.add_request(f"r{i}", p, params)
    execute = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("lost GPU")))
    final = {out.request_id: out for out in engine.step() if out.finished}
    assert sorted(final) == ["r0", "r1", "r2"] and not engine.has_unfinished()
    assert engine.failure and "lost GPU" in engine.failure and "probe" in engine.failure, engine.failure
    _one_line(engine.failure)
    assert all(isinstance(out.error, EngineError) and str(out.error) == engine.failure and
               out.finish_reason == "error" for out in final.values())
    assert engine.num_free_blocks == engine.num_total_blocks
    with pytest.raises(EngineError, match="lost GPU"):
        engine.add_request("later", [1, 2], params)
    monkeypatch.setattr(engine.runner, "execute", execute)
    engine.failure = None  # the module's shared engine serves the other tests again


def test_one_bad_request_sent_again_and_again_does_not_fail_the_engine(monkeypatch, reference):
    """The probe runs the model alone on other tokens: a request's own fault, however often, leaves it serving."""
    failed = _poison(monkeypatch, reference)
    engine = reference.engine
    for i in range(4):
        engine.add_request(f"poison-{i}", POISON + [i], SamplingParams(max_tokens=3))
        outs = [out for out in engine.step() if out.finished]
        assert [out.finish_reason for out in outs] == ["error"] and engine.failure is None
    assert len(failed) == 4
    assert reference.generate([[40, 41]], SamplingParams(max_tokens=4))[0].finish_reason == "length"


_FAULTY_SERVE = """
import os, sys
from rdnac.runtime.model_runner import ModelRunner
execute = ModelRunner.execute
def execute_or_fault(self, *args, **kwargs):  # the injected fault: every step fails once the flag file exists
    if os.path.exists(os.environ["FAULT_FLAG"]):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
    return execute(self, *args, **kwargs)
ModelRunner.execute = execute_or_fault
from rdnac.cli.main import main
sys.argv[0] = "rdnac"
main()
"""


def test_server_with_a_persistent_fault_turns_unhealthy(plan, reference, tmp_path):
    """The real `rdnac serve` on loopback with a fault injected into every step from some point on: requests
    in flight and later ones get 503 with the reason, /health 503 with it, and the log says so once."""
    script, flag, log = tmp_path / "faulty_serve.py", tmp_path / "broken", tmp_path / "serve.log"
    script.write_text(_FAULTY_SERVE)
    body = {"prompt": "still fine", "max_tokens": 8, "temperature": 0}
    expected = reference.generate("still fine", SamplingParams(max_tokens=8))[0].text
    with serve_process(plan, "--model-name", MODEL, env={"FAULT_FLAG": str(flag)}, log_path=log,
                       main=(str(script),)) as (proc, url):
        assert _post(url, "/v1/completions", body).json()["choices"][0]["text"] == expected
        flag.write_text("")  # from now on every step fails: a lost device
        with ThreadPoolExecutor(3) as pool:
            stream = pool.submit(lambda: _stream_lines(url, {**body, "max_tokens": 50, "stream": True}))
            failed = list(pool.map(lambda p: _post(url, "/v1/completions", {**body, "prompt": p}), ["a", "bb"]))
        for response in failed:
            assert response.status_code == 503, response.text
            assert "illegal memory access" in _error(response)["message"] and "probe" in _error(response)["message"]
        status, lines = stream.result()
        if status == 200:  # it had started streaming: its last event before [DONE] is the error
            assert lines[-1] == "data: [DONE]", lines
            assert "illegal memory access" in json.loads(lines[-2][len("data: "):])["error"]["message"], lines
        else:
            assert status == 503, lines
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        reason = health.json()["error"]
        assert "illegal memory access" in reason and "restart" in reason, reason
        _one_line(reason)
        later = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert later.status_code == 503 and _error(later)["message"] == reason, later.text
        assert proc.poll() is None  # the process stays up for its supervisor to restart it
        flag.unlink()  # the fault is gone, but the engine stays failed: nothing half-known is served
        assert _post(url, "/v1/completions", body).status_code == 503
        assert httpx.get(f"{url}/health").status_code == 503
    text = log.read_text()
    print(text)
    assert text.count("engine unhealthy") == 1 and text.count("the engine failed; /health answers 503") == 1, text
    assert "illegal memory access" in text


def _stream_lines(url: str, body: dict) -> tuple[int, list[str]]:
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        return r.status_code, [line for line in r.iter_lines() if line]


# ---------------------------------------------------------------- 2. body limit, tokenizing, length first

def _raw_request(url: str, head: str, body: bytes = b"", timeout: float = 10) -> bytes:
    """Send a request head (and some body) on a raw socket; returns what the server answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            part = s.recv(65536)
            if not part:
                break
            data += part
        return data


def test_body_over_limit_gets_413_before_it_is_read(url):
    # the head announces 50 MB and only one byte follows: a server that read the body first would never answer
    head = ("POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            "Content-Length: 50000000\r\n\r\n")
    answer = _raw_request(url, head, b"{")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

    # without a Content-Length (chunked), the server stops at the limit
    def chunks():
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'
    response = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == 413
    error = _error(response)
    assert error["code"] == "request_too_large" and str(1 << 20) in error["message"]
    _one_line(error["message"])
    assert httpx.get(f"{url}/health").status_code == 200


def test_prompt_length_checked_before_the_engine_sees_it(monkeypatch, url, llm):
    limit = llm.max_model_len
    rejected = _metrics(url)["rdnac_requests_rejected_total"]
    threads = []
    encode = llm.tokenizer.encode

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return encode(*args, **kwargs)
    monkeypatch.setattr(llm.tokenizer, "encode", recording)

    for body, n in (({"prompt": [5] * 100_000}, 100_000), ({"prompt": "z" * 300_000}, 300_000),
                    ({"prompt": "y" * limit}, limit)):
        response = _post(url, "/v1/completions", {**body, "max_tokens": 1})
        assert response.status_code == 400, response.text
        error = _error(response)
        assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"
        assert f"prompt of {n} tokens" in error["message"] and f"max model length {limit}" in error["message"]
        _one_line(error["message"])
    response = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "w" * 5000}]})
    assert response.status_code == 400 and str(limit) in _error(response)["message"]

    assert threads and "rdnac-engine" not in threads  # tokenized off the engine thread
    assert _metrics(url)["rdnac_requests_rejected_total"] == rejected  # refused before reaching the engine
    ok = _post(url, "/v1/completions", {"prompt": "fine", "max_tokens": 2})
    assert ok.status_code == 200 and "rdnac-engine" not in threads


# ---------------------------------------------------------------- 3. logprobs and unknown fields

def _reference_top(reference, prompt_ids: list[int], token_ids: list[int], k: int) -> list[list[tuple[int, float]]]:
    """Per generated token: the k most likely (id, logprob) from the plan's logits of the sequence so far."""
    logprobs = reference.logits(prompt_ids + token_ids[:-1])[len(prompt_ids) - 1:].log_softmax(-1)  # [N, V]
    values, ids = logprobs.topk(k, dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def _check_top(served: list[list[tuple[str, float]]], expected: list[list[tuple[int, float]]], reference) -> None:
    assert len(served) == len(expected)
    for ours, theirs in zip(served, expected):
        assert [t for t, _ in ours] == [reference.tokenizer.decode([i], skip_special_tokens=False) for i, _ in theirs]
        assert [lp for _, lp in ours] == pytest.approx([lp for _, lp in theirs], abs=1e-4)


def test_logprobs_and_top_logprobs_served(url, reference):
    prompt_ids = reference.encode_prompt("Hello there")
    expected = reference.generate("Hello there", SamplingParams(max_tokens=6, logprobs=True))[0]
    top = _reference_top(reference, prompt_ids, expected.token_ids, 3)
    assert [alts[0][0] for alts in top] == expected.token_ids  # greedy: the chosen token leads
    for stream in (False, True):
        body = {"prompt": "Hello there", "max_tokens": 6, "temperature": 0, "logprobs": 3, "stream": stream}
        if stream:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                events = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
            parts = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
            logprobs = {k: sum((p[k] for p in parts), []) for k in ("tokens", "token_logprobs", "top_logprobs")}
        else:
            logprobs = _post(url, "/v1/completions", body).json()["choices"][0]["logprobs"]
        assert len(logprobs["tokens"]) == len(expected.token_ids)
        assert logprobs["token_logprobs"] == pytest.approx(expected.logprobs, abs=1e-5)
        # OpenAI's legacy shape is {token string: logprob}: byte tokens that decode alike merge, the last wins
        decode = lambda i: reference.tokenizer.decode([i], skip_special_tokens=False)  # noqa: E731
        expected_top = [dict((decode(i), lp) for i, lp in alts) for alts in top]
        assert len(logprobs["top_logprobs"]) == len(expected_top)
        for ours, theirs in zip(logprobs["top_logprobs"], expected_top):
            assert list(ours) == list(theirs) and list(ours.values()) == pytest.approx(list(theirs.values()), abs=1e-4)
    body = _post(url, "/v1/completions", {"prompt": "Hello there", "max_tokens": 6, "temperature": 0,
                                          "logprobs": 0}).json()
    assert body["choices"][0]["logprobs"]["top_logprobs"] is None  # none asked for

    chat_ids = reference.encode_prompt([{"role": "user", "content": "Hi"}])
    expected = reference.generate("Hi", SamplingParams(max_tokens=6, logprobs=True), chat=True)[0]
    body = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                                               "temperature": 0, "logprobs": True, "top_logprobs": 2}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx(expected.logprobs, abs=1e-5)
    _check_top([[(a["token"], a["logprob"]) for a in c["top_logprobs"]] for c in content],
               _reference_top(reference, chat_ids, expected.token_ids, 2), reference)
    assert all(bytes(a["bytes"]).decode() == a["token"] for c in content for a in c["top_logprobs"])
    body = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                                               "temperature": 0, "logprobs": True}).json()
    assert [c["top_logprobs"] for c in body["choices"][0]["logprobs"]["content"]] == [[]] * len(content)

    with pytest.raises(RequestError, match="top_logprobs requires an integer in 0..20, with logprobs=True"):
        SamplingParams(top_logprobs=2)

    # what cannot be answered is refused, never answered with null
    refused = [("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
                "top_logprobs")]
    for path, body, param in refused:
        response = _post(url, path, body)
        assert response.status_code == 400 and _error(response)["param"] == param, response.text


def test_fields_that_change_results_are_refused_by_name(url):
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    completion = {"prompt": "x", "max_tokens": 2}
    # n, logit_bias, echo, min_tokens and penalties are served now (tests/test_serve_api.py): what is refused
    # is a value outside what rdnac can honour
    cases = [(completion, "n", 17), (completion, "best_of", 3), (completion, "logit_bias", {"99999": 10}),
             (completion, "suffix", "x"), (completion, "top_logprobs", 2), (completion, "min_tokens", -1),
             (completion, "frobnicate", 1), (chat, "n", 99), (chat, "tool_choice", "required"),
             (chat, "presence_penalty", 2.5), (chat, "guided_json", {"type": "object"}),
             (chat, "functions", [{"name": "f"}])]
    for base, field, value in cases:
        path = "/v1/completions" if "prompt" in base else "/v1/chat/completions"
        response = _post(url, path, {**base, field: value})
        assert response.status_code == 400, (field, response.text)
        error = _error(response)
        assert error["param"] == field and field in error["message"], error
        _one_line(error["message"])
    # bodies Python's json refuses past the syntax: an integer of 5000 digits, nesting deeper than the stack
    huge_int = b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}"
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for raw in (huge_int, deep):
        response = httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "valid JSON" in _error(response)["message"], response.text[:300]
    # fields that change nothing are accepted
    for field, value in (("user", "u-1"), ("metadata", {"k": "v"}), ("store", False)):
        assert _post(url, "/v1/completions", {**completion, field: value}).status_code == 200


# ---------------------------------------------------------------- 4. a taken port

def test_port_in_use_fails_with_one_line_before_serving(plan):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "rdnac.cli.main", "serve", str(plan), "--port", str(port)],
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 1
    assert result.stdout == "" and "serving" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: rdnac serve requires a free port; got 127.0.0.1:{port} already in use; stop what "
                     f"listens there or pick another with --port"], result.stderr


# ---------------------------------------------------------------- 5. defaults: the plan's, as `rdnac run`

@pytest.fixture(scope="module")
def sampling_plan(tmp_path_factory):
    """A plan whose generation_config samples (do_sample, temperature 0.7, top_k 20)."""
    tmp = tmp_path_factory.mktemp("sampling_plan")
    make_checkpoint("llama", tmp / "ckpt", seed=3)
    (tmp / "ckpt" / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_k": 20}))
    return rdnac.compile(tmp / "ckpt", target="cpu", output=tmp / "sampling.msgpack", quiet=True)


def _rdnac_run(*args: str) -> str:
    result = CliRunner().invoke(cli, ["run", *args])
    assert result.exit_code == 0, result.output
    return result.stdout.removesuffix("\n")


def test_server_defaults_are_rdnac_runs(plan, url, sampling_plan):
    # no sampling fields: the plan says nothing, so both are greedy
    for prompt in ("The capital of France is", "Once upon"):
        expected = _rdnac_run(str(plan), "--prompt", prompt, "--max-tokens", "12")
        body = _post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 12}).json()
        assert body["choices"][0]["text"] == expected
    expected = _rdnac_run(str(plan), "--chat", "Hi there", "--max-tokens", "12")
    body = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi there"}],
                                               "max_tokens": 12}).json()
    assert body["choices"][0]["message"]["content"] == expected

    # a plan whose generation_config samples: the same seed gives the same tokens both ways
    sampler = rdnac.load(sampling_plan)
    with serving(sampler) as sampling_url:
        for seed in (1, 2, 3):
            expected = _rdnac_run(str(sampling_plan), "--prompt", "Tell me", "--max-tokens", "12", "--seed", str(seed))
            body = _post(sampling_url, "/v1/completions", {"prompt": "Tell me", "max_tokens": 12, "seed": seed}).json()
            assert body["choices"][0]["text"] == expected
            greedy = _post(sampling_url, "/v1/completions", {"prompt": "Tell me", "max_tokens": 12, "seed": seed,
                                                             "temperature": 0}).json()
            assert greedy["choices"][0]["text"] == _rdnac_run(str(sampling_plan), "--prompt", "Tell me",
                                                              "--max-tokens", "12", "--temperature", "0")


# ---------------------------------------------------------------- 15. the API key's sources, /metrics behind it

def test_api_key_from_environment_and_metrics_behind_it(plan):
    with serve_process(plan, "--auth-metrics", env={"RDNAC_API_KEY": "from-env"}) as (proc, url):
        assert "from-env" not in " ".join(proc.args)
        assert httpx.get(f"{url}/health").status_code == 200  # health stays open for load balancers
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(f"{url}{path}").status_code == 401
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer from-env"}).status_code == 200
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="from-env", max_retries=0)
        assert client.completions.create(model="ckpt", prompt="k", max_tokens=2).choices[0].finish_reason


def test_api_key_from_file(plan, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    with serve_process(plan, "--api-key-file", str(key_file)) as (_, url):
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-file"}).status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200  # open without --auth-metrics

    (tmp_path / "empty").write_text("")
    for args, env, needle in (
            (["--api-key", "a", "--api-key-file", str(key_file)], {}, "requires one API key"),
            (["--api-key-file", str(key_file)], {"RDNAC_API_KEY": "b"}, "requires one API key"),
            (["--auth-metrics"], {}, "--auth-metrics requires an API key")):
        result = CliRunner().invoke(cli, ["serve", str(plan), "--port", str(_free_port()), *args], env=env)
        assert result.exit_code == 1 and needle in result.output, result.output
        _one_line(result.output.strip())
    result = CliRunner().invoke(cli, ["serve", str(plan), "--api-key-file", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "first line" in result.output
