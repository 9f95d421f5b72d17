"""One request through every entry point (Python API, `rdnac run`, `rdnac serve`), alone and inside a
batch of 17 others with other prompts and sampling params: the acceptance check of issue 22 that a seed
gives the same tokens everywhere. Shared by the cpu test and the GPU one."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from click.testing import CliRunner

from rdnac import SamplingParams
from rdnac.cli.main import cli

PROMPT = "The capital of France is"
TARGET = dict(max_tokens=16, temperature=0.8, seed=1234)


def others(num: int = 17) -> list[tuple[str, dict]]:
    """`num` other requests: other prompts, greedy and sampled, seeded and not, every truncation knob,
    a repetition penalty, stop strings, logprobs, other lengths."""
    rng = random.Random(5)
    words = ["river", "mountain", "seven", "blue", "quantum", "bread", "Paris", "engine", "slowly", "why"]
    out = []
    for i in range(num):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randrange(1, 12)))
        params = dict(max_tokens=rng.randrange(4, 24), temperature=rng.choice([0.0, 0.5, 0.8, 1.3]))
        if i % 2:
            params["seed"] = rng.randrange(1 << 31)
        knob = i % 6
        if knob == 1:
            params["top_k"] = rng.randrange(1, 50)
        elif knob == 2:
            params["top_p"] = rng.choice([0.5, 0.9])
        elif knob == 3:
            params["min_p"] = 0.1
        elif knob == 4:
            params["repetition_penalty"] = 1.3
        elif knob == 5:
            params["stop"] = ["e"]
        out.append((prompt, params))
    return out


def api_outputs(llm, with_others: bool, logprobs: bool = True):
    """The target's RequestOutput from `llm.generate`, alone or first of a batch of 18."""
    batch = [(PROMPT, TARGET)] + (others() if with_others else [])
    params = [SamplingParams(**p, logprobs=logprobs) for _, p in batch]
    return llm.generate([p for p, _ in batch], params)[0]


def cli_text(plan: Path, *extra: str, chat: bool = False) -> str:
    """What `rdnac run` prints for the target request (CliRunner: the real command, in process)."""
    args = ["run", str(plan), "--chat" if chat else "--prompt", PROMPT, "--temperature", str(TARGET["temperature"]),
            "--seed", str(TARGET["seed"]), "--max-tokens", str(TARGET["max_tokens"]), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`rdnac serve PLAN` in a subprocess on a loopback port."""

    def __init__(self, plan: Path, *extra: str):
        self.url = f"http://127.0.0.1:{_free_port()}"
        port = self.url.rsplit(":", 1)[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "rdnac.cli.main", "serve", str(plan), "--port", port,
                                      *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"rdnac serve exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.close()
        raise AssertionError("rdnac serve did not come up in 120 s")

    def complete(self, prompt: str, params: dict) -> dict:
        body = {"prompt": prompt, "logprobs": 1, **params}
        response = httpx.post(f"{self.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    def complete_batch(self, requests: list[tuple[str, dict]]) -> list[dict]:
        """All requests in flight at once (one HTTP request each), so the engine batches them."""
        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(lambda r: self.complete(*r), requests))

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics").text

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def check_same_tokens(llm, plan: Path, *run_args: str, serve_args: tuple[str, ...] = (), logprob_atol: float = 1e-5,
                      serve: bool = True):
    """The whole acceptance check (the server leg only with `serve`); returns the target's token ids."""
    alone = api_outputs(llm, with_others=False)
    assert len(alone.token_ids) >= 1 and alone.finished
    # the plain sampling path (no logprobs: the path the decode graphs capture) gives the same tokens
    assert api_outputs(llm, with_others=False, logprobs=False).token_ids == alone.token_ids
    batched = api_outputs(llm, with_others=True)
    assert batched.token_ids == alone.token_ids, "the batch changed the seeded request's tokens"
    assert batched.text == alone.text
    assert api_outputs(llm, with_others=True, logprobs=False).token_ids == alone.token_ids
    unseeded = [llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.8))[0].token_ids
                for _ in range(3)]
    assert len({tuple(t) for t in unseeded}) > 1, "unseeded requests must be random"

    assert cli_text(plan, *run_args) == alone.text, "rdnac run differs from the Python API"
    chat = llm.generate([PROMPT], SamplingParams(**TARGET), chat=True)[0]
    assert cli_text(plan, *run_args, chat=True) == chat.text, "rdnac run --chat differs from the Python API"

    if serve:
        check_served_tokens(llm, alone, plan, *serve_args, logprob_atol=logprob_atol)
    return alone.token_ids


def check_served_tokens(llm, alone, plan: Path, *serve_args: str, logprob_atol: float = 1e-5) -> None:
    """`rdnac serve` (a real server on loopback) gives `alone`'s text, token strings and logprobs, alone and
    inside a batch of 17 others."""
    token_strings = [llm.tokenizer.decode([t], skip_special_tokens=False) for t in alone.token_ids]
    server = Server(plan, *serve_args)
    try:
        served = [server.complete(PROMPT, TARGET)]
        served += server.complete_batch([(PROMPT, TARGET)] + others())[:1]
    finally:
        server.close()
    for choice in served:
        assert choice["text"] == alone.text, "rdnac serve differs from the Python API"
        assert choice["logprobs"]["tokens"] == token_strings
        for ours, theirs in zip(alone.logprobs, choice["logprobs"]["token_logprobs"]):
            assert abs(ours - theirs) <= logprob_atol, (ours, theirs)



def check_batched_greedy_matches_alone(llm, prompts: list[list[int]], params: list[SamplingParams]) -> None:
    """All `prompts` submitted at once to one cpu LLMEngine over `llm`'s runner give each request's tokens
    run alone, and they really ran together (the engine held every one of them in one step)."""
    from rdnac.runtime.llm_engine import LLMEngine

    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    engine = LLMEngine(llm.runner)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    final, max_running = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.token_ids
        max_running = max(max_running, engine.stats()["running"])
    assert [final[f"r{i}"] for i in range(len(prompts))] == alone
    assert max_running == len(prompts)
