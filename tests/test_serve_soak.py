"""A bounded serving soak (issue 23's acceptance): many clients on loopback against one `rdnac serve`
process, mixing valid requests with malformed ones, out-of-range seeds, bodies over the limit and
clients that disconnect mid-answer.

The reference is the server itself, serially: every valid request is first run alone, and every answer
it gives under load must be identical. Afterwards /health is 200, every KV block is free (its /metrics)
and the server's RSS grew less than 10% over the soak (measured after a warm-up of the same mix).
RDNAC_SOAK_CLIENTS and RDNAC_SOAK_SECONDS scale it (CI: 64 clients, 60 s, on a tiny cpu plan). Bounded: every
client has a timeout, the soak waits at most 180 s past its end, and a client that hangs fails it.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time

import httpx
import pytest

import rdnac
from tests.support.checkpoints import make_checkpoint
from tests.test_serve import MODEL, _wait_until, parse_prometheus
from tests.test_serve_hardening import serve_process

NUM_CLIENTS = int(os.environ.get("RDNAC_SOAK_CLIENTS", "64"))
SECONDS = float(os.environ.get("RDNAC_SOAK_SECONDS", "60"))
MAX_BODY_BYTES = 1_000_000
BIG_BODY = json.dumps({"prompt": "a" * 5_000_000, "max_tokens": 1}).encode()  # 5 MB


def _valid_requests() -> list[tuple[str, dict]]:
    """(path, body) of the valid requests: greedy and seeded, completions and chat, streamed or not."""
    rng = random.Random(0)
    out = []
    for i in range(8):
        out.append(("/v1/completions", {"prompt": f"Soak prompt {i}: " + "xy" * rng.randrange(0, 20),
                                        "max_tokens": rng.randrange(4, 17), "temperature": 0}))
    for i, seed in enumerate((1, 77, (1 << 63) - 1, -(1 << 63))):
        out.append(("/v1/completions", {"prompt": [rng.randrange(3, 250) for _ in range(rng.randrange(2, 40))],
                                        "max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": seed,
                                        "ignore_eos": True}))
    for i in range(3):
        out.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": f"chat {i}"}],
                                             "max_tokens": 10, "temperature": 0}))
    out += [(path, {**body, "stream": True}) for path, body in out[::3]]
    return out


# malformed or refused requests, each with the status it must get
_INVALID = [
    ("/v1/completions", b'{"prompt": "unterminated', 400),
    ("/v1/completions", json.dumps({"prompt": 5}).encode(), 400),
    ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "x", "seed": 1 << 64}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "x", "seed": 1 << 63}).encode(), 400),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                         "seed": -(1 << 70)}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "x", "logit_bias": {"99999999": 5}}).encode(), 400),  # out of vocab
    ("/v1/completions", json.dumps({"prompt": "x", "logprobs": 50}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": [7] * 400, "max_tokens": 1}).encode(), 400),
    ("/v1/completions", b"[1, 2, 3]", 400),
    ("/v1/completions", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400),
    ("/v1/completions", json.dumps({"prompt": "x", "n": 4, "frobnicate": True}).encode(), 400),
]
_LONG = {"prompt": "never ending", "max_tokens": 200, "temperature": 0, "ignore_eos": True}


def _answer(path: str, body: dict, response_lines=None, response_json=None) -> tuple[str, str | None]:
    """(text, finish_reason) of a full answer, streamed or not."""
    if response_json is not None:
        choice = response_json["choices"][0]
        return (choice["message"]["content"] if "chat" in path else choice["text"]), choice["finish_reason"]
    assert response_lines[-1] == "data: [DONE]", response_lines[-3:]
    text, reason = "", None
    for line in response_lines[:-1]:
        data = json.loads(line[len("data: "):])
        assert "error" not in data, data
        for choice in data["choices"]:
            text += (choice["delta"].get("content") or "") if "chat" in path else choice["text"]
            reason = choice["finish_reason"] or reason
    return text, reason


def _ask(client: httpx.Client, path: str, body: dict) -> tuple[str, str | None]:
    if body.get("stream"):
        with client.stream("POST", path, json=body) as response:
            assert response.status_code == 200, response.read()
            return _answer(path, body, response_lines=[line for line in response.iter_lines() if line])
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return _answer(path, body, response_json=response.json())


class Soak:
    def __init__(self, url: str, valid: list, expected: list):
        self.url, self.valid, self.expected = url, valid, expected
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []
        self.answered: set[int] = set()  # the valid requests answered in full, identically (by index)
        self.lock = threading.Lock()

    def note(self, kind: str, failure: str | None = None) -> None:
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if failure is not None:
                self.failures.append(f"{kind}: {failure}")

    def client(self, index: int, deadline: float) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while time.monotonic() < deadline:
                roll = rng.random()
                try:
                    if roll < 0.5:
                        self.valid_request(client, rng.randrange(len(self.valid)))
                    elif roll < 0.8:
                        self.invalid_request(client, rng)
                    elif roll < 0.84:
                        self.big_body(client)
                    else:
                        self.disconnect(rng)
                except Exception as e:  # noqa: BLE001 -- a soak records every failure and reports them all
                    self.note("exception", f"{type(e).__name__}: {e}")

    def valid_request(self, client: httpx.Client, i: int) -> None:
        path, body = self.valid[i]
        got = _ask(client, path, body)
        failure = None if got == self.expected[i] else f"{path} {body}: got {got}, serially {self.expected[i]}"
        if failure is None:
            with self.lock:
                self.answered.add(i)
        self.note("valid", failure)

    def invalid_request(self, client: httpx.Client, rng: random.Random) -> None:
        path, raw, status = rng.choice(_INVALID)
        response = client.post(path, content=raw, headers={"content-type": "application/json"})
        ok = response.status_code == status and set(response.json()) == {"error"}
        self.note("invalid", None if ok else f"{raw[:80]!r}: {response.status_code} {response.text[:200]}")
        if b'"seed"' in raw:
            self.note("huge_seed")

    def big_body(self, client: httpx.Client) -> None:
        # the server answers 413 from the head and closes the connection; the client may or may not have
        # finished sending by then: a 413 or a closed connection, never an answer
        try:
            response = httpx.post(f"{self.url}/v1/completions", content=BIG_BODY,
                                  headers={"content-type": "application/json"}, timeout=60)
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            self.note("big_body_closed")
            return
        self.note("big_body", None if response.status_code == 413 else f"{response.status_code}")

    def disconnect(self, rng: random.Random) -> None:
        path = "/v1/completions"
        if rng.random() < 0.5:  # a streaming client that reads a little, then goes away
            with httpx.stream("POST", f"{self.url}{path}", json={**_LONG, "stream": True}, timeout=60) as response:
                for _ in zip(range(rng.randrange(1, 4)), response.iter_lines()):
                    pass
        else:  # a client that gives up before the answer
            try:
                httpx.post(f"{self.url}{path}", json=_LONG, timeout=rng.uniform(0.02, 0.3))
            except httpx.TimeoutException:
                pass
        self.note("disconnect")

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self.client, args=(i, deadline)) for i in range(NUM_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 180)
        assert not any(t.is_alive() for t in threads), "a soak client hung"


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _idle(url: str) -> dict[str, float] | None:
    m = parse_prometheus(httpx.get(f"{url}/metrics").text)
    if m["rdnac_requests_running"] == m["rdnac_requests_waiting"] == 0:
        return m
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's RSS from /proc")
def test_serving_soak(tmp_path):
    make_checkpoint("llama", tmp_path / "ckpt")
    plan = rdnac.compile(tmp_path / "ckpt", target="cpu", output=tmp_path / "tiny.msgpack", quiet=True)
    valid = _valid_requests()
    with serve_process(plan, "--model-name", MODEL, "--max-body-bytes", str(MAX_BODY_BYTES)) as (proc, url):
        with httpx.Client(base_url=url, timeout=120) as client:
            expected = [_ask(client, path, body) for path, body in valid]  # each alone: the serial runs
        assert all(reason in ("stop", "length") for _, reason in expected)

        Soak(url, valid, expected).run(min(6.0, SECONDS / 4))  # warm-up: allocator pools, threads, sockets
        _wait_until(lambda: _idle(url), 60, "the server to go idle after the warm-up")
        rss_before = _rss_bytes(proc.pid)

        soak = Soak(url, valid, expected)
        soak.run(SECONDS)
        # every valid request got a full answer identical to its serial run (a failure records any other
        # answer, status or exception), and each of them was asked
        assert not soak.failures, f"{len(soak.failures)} failures, e.g. {soak.failures[:5]} (counts {soak.counts})"
        assert soak.answered == set(range(len(valid))), sorted(set(range(len(valid))) - soak.answered)
        assert soak.counts.get("valid", 0) >= NUM_CLIENTS and soak.counts.get("invalid", 0) > 0
        assert soak.counts.get("huge_seed", 0) > 0 and soak.counts.get("disconnect", 0) > 0
        assert soak.counts.get("big_body", 0) + soak.counts.get("big_body_closed", 0) > 0

        health = httpx.get(f"{url}/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}, health.text
        metrics = _wait_until(lambda: _idle(url), 60, "the server to go idle")
        metrics = _wait_until(lambda: (m := _idle(url)) and m["rdnac_kv_blocks_free"] == m["rdnac_kv_blocks_total"]
                              and m, 30, "every KV block to be free")
        assert metrics["rdnac_kv_blocks_free"] == metrics["rdnac_kv_blocks_total"] > 0
        assert metrics['rdnac_requests_finished_total{finish_reason="error"}'] == 0
        assert metrics['rdnac_requests_finished_total{finish_reason="abort"}'] > 0  # the disconnects reached it
        rss_after = _rss_bytes(proc.pid)
        assert rss_after < 1.10 * rss_before, \
            f"RSS grew from {rss_before / 2**20:.0f} MiB to {rss_after / 2**20:.0f} MiB"
        print(f"soak: {NUM_CLIENTS} clients, {SECONDS:.0f} s: {soak.counts}; RSS {rss_before / 2**20:.0f} -> "
              f"{rss_after / 2**20:.0f} MiB")
