"""Model ids through a Hugging Face cache, the plan cache of `rdnac serve MODEL`, operations (vLLM-named
metrics, /version, CORS, RDNAC_* environment, logging, prefix caching), and `rdnac bench serve`.

The Hugging Face cache is built by hand in the hub's own layout (models--ORG--NAME/refs/main,
snapshots/SHA/...) around a tiny transformers checkpoint; no hub is reachable here, so HF_HUB_OFFLINE=1
(or an endpoint nothing listens on) stands for "offline". The served model is a real `rdnac serve`
process on a loopback port; the bench's percentiles are checked against a hand computation from the
per-request records it writes.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import rdnac
from rdnac.cli.main import cli
from rdnac.compiler.model_ids import ModelId, parse_model_id, pick_gguf
from rdnac.errors import CheckpointError, RdnacError
from tests.support.checkpoints import make_checkpoint, write_byte_tokenizer
from tests.test_serve import parse_prometheus

ROOT = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"


def _hf_cache(root: Path, repo: str, files_from: Path | None = None, *, sha: str = SHA, ref: str = "main") -> Path:
    """A hub cache at root/hub holding `repo` at commit `sha` (refs/`ref`); returns the snapshot dir."""
    folder = root / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(sha)
    if files_from is not None:  # the hub keeps files as blobs linked from the snapshot: do the same
        (folder / "blobs").mkdir(exist_ok=True)
        for file in sorted(files_from.iterdir()):
            blob = folder / "blobs" / file.name
            blob.write_bytes(file.read_bytes())
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny") / "ckpt"
    make_checkpoint("llama", directory)
    return directory


@pytest.fixture()
def hf_home(tmp_path, monkeypatch, tiny) -> Path:
    home = tmp_path / "hf"
    _hf_cache(home, "acme/tiny-llama", tiny)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return home


# ---------------------------------------------------------------- 1. model ids

def test_parse_model_id():
    assert parse_model_id("Qwen/Qwen3-8B") == ModelId("Qwen/Qwen3-8B")
    assert parse_model_id("Qwen/Qwen3-8B@main") == ModelId("Qwen/Qwen3-8B", "main")
    assert parse_model_id("unsloth/Qwen3-8B-GGUF:Q4_K_M") == ModelId("unsloth/Qwen3-8B-GGUF", None, "Q4_K_M")
    assert parse_model_id(f"a/b@{SHA}:q8_0") == ModelId("a/b", SHA, "q8_0")
    for local in ("demo:smollm2", "./a/b", "/abs/path", "model.gguf", "plain"):
        assert parse_model_id(local) is None, local


def test_compile_model_id_from_the_cache(hf_home, tmp_path):
    out = tmp_path / "plan.msgpack"
    result = CliRunner().invoke(cli, ["compile", "acme/tiny-llama", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    header = rdnac.plans.read_plan(out, header_only=True).header
    assert header["model"]["name"] == "tiny-llama"
    assert header["model"]["model_id"] == "acme/tiny-llama" and header["model"]["revision"] == SHA
    # by commit too, and the plan computes what a plan of the directory computes
    by_sha = rdnac.compile(f"acme/tiny-llama@{SHA}", output=tmp_path / "sha.msgpack", quiet=True)
    ids = [1, 5, 9, 42]
    assert rdnac.load(by_sha).engine.logits(ids).equal(rdnac.load(out).engine.logits(ids))


def test_revision_by_branch_and_hf_hub_cache(hf_home, tiny, tmp_path, monkeypatch):
    from rdnac.compiler.frontend import read_checkpoint

    other = "fedcba9876543210fedcba9876543210fedcba98"
    _hf_cache(hf_home, "acme/branchy", tiny, sha=other, ref="v2")
    checkpoint = read_checkpoint("acme/branchy@v2")
    assert checkpoint.source == {"model_id": "acme/branchy@v2", "name": "branchy", "commit": other}
    with pytest.raises(CheckpointError, match="models--acme--branchy"):
        read_checkpoint("acme/branchy@v3")  # no such ref in the cache, offline
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))  # HF_HUB_CACHE wins over HF_HOME
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    assert read_checkpoint("acme/branchy@v2").source["commit"] == other


def test_serve_missing_plan_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "gone.msgpack")])
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: {tmp_path / 'gone.msgpack'}: requires an existing plan file (or a "
                                     "model: a directory, .gguf, model id or demo:NAME, compiled on first use); "
                                     "got no such file")


def test_unknown_model_id_offline_names_the_cache(hf_home, tmp_path):
    result = CliRunner().invoke(cli, ["compile", "acme/absent-model", "-o", str(tmp_path / "x.msgpack")])
    assert result.exit_code == 1
    line = result.output.strip()
    assert line.count("\n") == 0, line
    assert str(hf_home / "hub") in line and "models--acme--absent-model" in line and "HF_HUB_OFFLINE" in line


def test_unreachable_hub_names_the_cache(hf_home, monkeypatch):
    """Not offline by flag, but nothing answers: the download is tried, fails, and the line names the cache."""
    from rdnac.compiler.frontend import read_checkpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint("acme/absent-model")
    assert str(hf_home / "hub") in str(e.value) and "downloading it failed" in str(e.value)


def test_gguf_quant_picked_like_llama_cpp():
    files = ["Tiny-Q4_K_M.gguf", "Tiny-Q4_K_S.gguf", "Tiny-Q8_0.gguf", "mmproj-Tiny-f16.gguf",
             "big/Tiny-Q6_K-00001-of-00002.gguf", "big/Tiny-Q6_K-00002-of-00002.gguf"]
    repo = "acme/Tiny-GGUF"
    assert pick_gguf(files, ModelId(repo, quant="q8_0")) == "Tiny-Q8_0.gguf"  # case-insensitive
    assert pick_gguf(files, ModelId(repo, quant="Q4_K_M")) == "Tiny-Q4_K_M.gguf"
    assert pick_gguf(files, ModelId(repo)) == "Tiny-Q4_K_M.gguf"  # llama.cpp's default quant
    assert pick_gguf(files, ModelId(repo, quant="Q6_K")) == "big/Tiny-Q6_K-00001-of-00002.gguf"
    with pytest.raises(CheckpointError, match=r"quant Q4_K; no file matches; the repo's quants: .*Q4_K_M"):
        pick_gguf(files, ModelId(repo, quant="Q4_K"))  # Q4_K is not a prefix match of Q4_K_M


def test_gguf_model_id_and_tokenizer_override(hf_home, tmp_path):
    from tests.test_gguf_reader import write_tiny

    ggufs = tmp_path / "ggufs"
    ggufs.mkdir()
    write_tiny(ggufs / "tiny-Q8_0.gguf", types={})
    (ggufs / "tiny-F16.gguf").write_bytes((ggufs / "tiny-Q8_0.gguf").read_bytes())
    _hf_cache(hf_home, "acme/tiny-GGUF", ggufs)
    plan = rdnac.compile("acme/tiny-GGUF:q8_0", output=tmp_path / "g.msgpack", quiet=True)
    header = rdnac.plans.read_plan(plan, header_only=True).header
    assert header["model"]["path"].endswith("tiny-Q8_0.gguf") and header["model"]["format"] == "gguf"
    with pytest.raises(CheckpointError, match="requires one GGUF file for quant Q4_K_M"):
        rdnac.compile("acme/tiny-GGUF", output=tmp_path / "none.msgpack", quiet=True)

    tok = tmp_path / "tok"
    tok.mkdir()
    write_byte_tokenizer(tok, 300)
    result = CliRunner().invoke(cli, ["compile", "acme/tiny-GGUF:Q8_0", "--tokenizer", str(tok), "-o",
                                      str(tmp_path / "t.msgpack"), "-q"])
    assert result.exit_code == 0, result.output
    body = rdnac.plans.read_plan(tmp_path / "t.msgpack").body
    assert body["tokenizer"]["json"] == (tok / "tokenizer.json").read_text()
    assert body["chat_template"] == json.loads((tok / "tokenizer_config.json").read_text())["chat_template"]
    assert any("--tokenizer" in d["action"] for d in body["decisions"])
    bad = CliRunner().invoke(cli, ["compile", "acme/tiny-GGUF:Q8_0", "--tokenizer", str(tmp_path), "-o",
                                   str(tmp_path / "u.msgpack")])
    assert bad.exit_code == 1 and "requires a directory with tokenizer.json" in bad.output


# ---------------------------------------------------------------- 2. the plan cache

def test_plan_cache_hit_miss_and_key(hf_home, tiny, tmp_path):
    from rdnac.compiler.plan_cache import cached_plan, plan_cache_dir

    assert plan_cache_dir() == tmp_path / "xdg" / "rdnac" / "plans"
    first, was_cached = cached_plan("acme/tiny-llama", "auto")
    assert not was_cached and first.parent == plan_cache_dir() and ".cpu." in first.name
    again, was_cached = cached_plan("acme/tiny-llama", "cpu")
    assert was_cached and again == first
    other, was_cached = cached_plan("acme/tiny-llama", "cpu", {"max_model_len": 128})
    assert not was_cached and other != first  # options are in the key
    # a local directory is keyed by its contents: a changed file is another plan
    local = tmp_path / "local"
    local.mkdir()
    for f in tiny.iterdir():
        (local / f.name).write_bytes(f.read_bytes())
    a, _ = cached_plan(str(local), "cpu")
    b, was_cached = cached_plan(str(local), "cpu")
    assert was_cached and a == b
    cfg = json.loads((local / "generation_config.json").read_text())
    cfg["temperature"] = 0.5
    (local / "generation_config.json").write_text(json.dumps(cfg))
    c, was_cached = cached_plan(str(local), "cpu")
    assert not was_cached and c != a


def test_serve_limits_above_the_plan_are_one_line(tiny, tmp_path):
    plan = rdnac.compile(tiny, output=tmp_path / "p.msgpack", quiet=True, max_num_seqs=8)
    result = CliRunner().invoke(cli, ["serve", str(plan), "--max-num-seqs", "9", "--port", "1"])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: --max-num-seqs 9 requires at most the plan's 8; serve with "
                                     "--max-num-seqs 8 or less, or recompile with a larger --max-num-seqs")


def test_prefix_caching_default():
    from rdnac.serve.ops import prefix_caching

    paged = {"has_sequence_state": False}
    assert prefix_caching(None, paged)[0] is True and prefix_caching(False, paged)[0] is False
    recurrent = {"has_sequence_state": True}
    on, why = prefix_caching(None, recurrent)
    assert on is False and "per-sequence state" in why
    with pytest.raises(RdnacError, match="per-sequence state"):
        prefix_caching(True, recurrent)


def test_prefix_caching_follows_the_plans_state(tiny, tmp_path):
    """A paged-only plan serves with prefix caching on; a hybrid Gated DeltaNet plan (per-sequence state)
    keeps it off, and refuses it when asked, in one line, before anything loads."""
    from rdnac.serve.ops import plan_facts, prefix_caching
    from tests.test_qwen3_5 import CONFIG

    paged = rdnac.compile(tiny, output=tmp_path / "paged.msgpack", quiet=True)
    assert plan_facts(paged)["has_sequence_state"] is False
    make_checkpoint("qwen3_5_text", tmp_path / "gdn", **CONFIG)
    hybrid = rdnac.compile(tmp_path / "gdn", output=tmp_path / "gdn.msgpack", quiet=True)
    facts = plan_facts(hybrid)
    assert facts["has_sequence_state"] is True and prefix_caching(None, facts)[0] is False
    result = CliRunner().invoke(cli, ["serve", str(hybrid), "--enable-prefix-caching", "--port", "1"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("error: --enable-prefix-caching requires a plan whose state is all paged")


# ---------------------------------------------------------------- a served model, twice

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, str, float]:
    """`rdnac serve ...` in a process; returns it, its URL and the seconds until /health answered."""
    port = _free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rdnac.cli.main", "serve", *args], cwd=ROOT,
                            env={**env, "RDNAC_SERVE_PORT": str(port)},  # the port through the environment
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"rdnac serve exited {proc.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"rdnac serve did not answer /health: {log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_serve_model_id_compiles_once_then_reuses(hf_home, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RDNAC_SERVE_ALLOWED_ORIGINS": "http://example.test"}
    log_file = tmp_path / "serve.log"
    args = ["acme/tiny-llama", "--target", "auto", "--log-level", "info", "--log-file", str(log_file),
            "--max-model-len", "200"]
    proc, url, first_s = _start(args, env, tmp_path / "first.out")
    try:
        assert httpx.get(f"{url}/version").json()["version"] == rdnac.__version__
        # CORS from the environment (RDNAC_SERVE_ALLOWED_ORIGINS), through Starlette's middleware
        pre = httpx.options(f"{url}/v1/models", headers={"Origin": "http://example.test",
                                                         "Access-Control-Request-Method": "GET"})
        assert pre.headers["access-control-allow-origin"] == "http://example.test"
        assert httpx.get(f"{url}/v1/models", headers={"Origin": "http://elsewhere.test"}) \
            .headers.get("access-control-allow-origin") is None
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert models[0]["id"] == "tiny-llama" and models[0]["max_model_len"] == 200
        before = parse_prometheus(httpx.get(f"{url}/metrics").text)
        body = {"model": "tiny-llama", "prompt": "the same long prefix of a prompt, twice over", "max_tokens": 5,
                "temperature": 0}
        for _ in range(3):
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        m = parse_prometheus(httpx.get(f"{url}/metrics").text)
    finally:
        _stop(proc)
    out = (tmp_path / "first.out").read_text()
    assert "rdnac: compiled" in out and "limits: max model length 200 (plan: 200)" in out
    assert "prefix caching on" in out
    logged = log_file.read_text()  # --log-file: rdnac's and uvicorn's loggers
    assert "rdnac.plan_cache: plan cache miss" in logged and "Application startup complete" in logged

    labels = 'model_name="tiny-llama",engine="0"'
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "inter_token_latency_seconds", "time_per_output_token_seconds",
                 "request_time_per_output_token_seconds"):
        assert m[f"vllm:{name}_count{{{labels}}}"] - before[f"vllm:{name}_count{{{labels}}}"] == \
            (3 * 4 if "inter_token" in name or name == "time_per_output_token_seconds" else 3), name
    assert m[f"vllm:generation_tokens_total{{{labels}}}"] == 15 == m["rdnac_generation_tokens_total"]
    assert m[f"vllm:prompt_tokens_total{{{labels}}}"] == m["rdnac_prompt_tokens_total"] > 0
    assert m[f'vllm:request_success_total{{{labels},finished_reason="length"}}'] == 3
    assert m[f"vllm:prefix_cache_queries_total{{{labels}}}"] == m["rdnac_prompt_tokens_total"]
    assert m[f"vllm:prefix_cache_hits_total{{{labels}}}"] > 0  # the 2nd and 3rd prompts hit the 1st's blocks
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"vllm:{name}{{{labels}}}" in m

    proc, url, second_s = _start(args, env, tmp_path / "second.out")
    _stop(proc)
    out = (tmp_path / "second.out").read_text()
    assert "rdnac: reused the cached plan" in out and "rdnac: compiled" not in out
    print(f"\nserve start, compiling: {first_s:.1f} s; reusing the cached plan: {second_s:.1f} s")


# ---------------------------------------------------------------- 7. bench serve

@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    plan = rdnac.compile(tiny, output=tmp_path_factory.mktemp("plan") / "tiny.msgpack", quiet=True)
    tmp = tmp_path_factory.mktemp("srv")
    proc, url, _ = _start([str(plan), "--model-name", "tiny"], {**os.environ, "PYTHONPATH": str(ROOT)},
                          tmp / "out")
    yield url
    _stop(proc)


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_bench_serve_writes_vllm_json(server, tmp_path, endpoint):
    args = ["bench", "serve", "--base-url", server, "--endpoint", endpoint, "--num-prompts", "8",
            "--random-input-len", "12", "--random-output-len", "6", "--request-rate", "40", "--max-concurrency",
            "3", "--percentile-metrics", "50,90,99", "--save-result", "--result-dir", str(tmp_path),
            "--result-filename", "r.json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Serving Benchmark Result" in result.output
    r = json.loads((tmp_path / "r.json").read_text())
    keys = {"date", "backend", "model_id", "tokenizer_id", "num_prompts", "request_rate", "burstiness",
            "max_concurrency", "duration", "completed", "total_input_tokens", "total_output_tokens",
            "request_throughput", "request_goodput", "output_throughput", "total_token_throughput", "input_lens",
            "output_lens", "ttfts", "itls", "generated_texts", "errors", "max_output_tokens_per_s",
            "max_concurrent_requests"}
    for metric in ("ttft", "tpot", "itl", "e2el"):
        keys |= {f"mean_{metric}_ms", f"median_{metric}_ms", f"std_{metric}_ms", f"p50_{metric}_ms",
                 f"p90_{metric}_ms", f"p99_{metric}_ms"}
    assert keys <= set(r), keys - set(r)
    assert r["completed"] == 8 and r["failed"] == 0 and not any(r["errors"])
    assert r["model_id"] == "tiny" and r["backend"] == ("openai-chat" if "chat" in endpoint else "openai")
    assert r["max_concurrent_requests"] <= 3
    assert r["total_output_tokens"] == sum(r["output_lens"]) and all(n >= 1 for n in r["output_lens"])
    assert r["total_input_tokens"] == sum(r["input_lens"])
    assert math.isclose(r["output_throughput"], r["total_output_tokens"] / r["duration"])
    assert math.isclose(r["request_throughput"], 8 / r["duration"])

    # the percentiles, by hand from the per-request records (ms; linear interpolation between ranks)
    def pct(values, p):
        s = sorted(values)
        k = (len(s) - 1) * p / 100
        f = int(k)
        return s[f] + (s[min(f + 1, len(s) - 1)] - s[f]) * (k - f)

    ttft = [t * 1000 for t in r["ttfts"]]
    e2el = [t * 1000 for t in r["e2els"]]
    itl = [g * 1000 for gaps in r["itls"] for g in gaps]
    tpot = [(e - t) / (n - 1) for e, t, n in zip(e2el, ttft, r["output_lens"]) if n > 1]
    assert len(itl) == sum(len(gaps) for gaps in r["itls"]) > 0 and tpot
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        assert math.isclose(r[f"mean_{name}_ms"], sum(values) / len(values), rel_tol=1e-9), name
        assert math.isclose(r[f"median_{name}_ms"], pct(values, 50), rel_tol=1e-9), name
        for p in (50, 90, 99):
            assert math.isclose(r[f"p{p}_{name}_ms"], pct(values, p), rel_tol=1e-9), (name, p)
        assert min(values) <= r[f"p99_{name}_ms"] <= max(values)
    assert all(t > 0 for t in r["ttfts"]) and all(e >= t for e, t in zip(r["e2els"], r["ttfts"]))


def test_bench_serve_file_datasets(tmp_path):
    from rdnac.bench.serve_client import arrival_gaps, file_requests

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('"plain prompt"\n{"prompt": "with length", "output_len": 3}\n\n')
    reqs = file_requests(jsonl, "jsonl", 4, 7, seed=0)
    assert sorted((q.prompt, q.output_len) for q in reqs) == [("plain prompt", 7)] * 2 + [("with length", 3)] * 2
    share = tmp_path / "s.json"
    share.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
                                 {"conversations": []}]))
    assert [q.prompt for q in file_requests(share, "sharegpt", 2, 5, seed=1)] == ["hi", "hi"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(RdnacError, match=r"bad.jsonl:1: requires one JSON value per line"):
        file_requests(bad, "jsonl", 1, 1, seed=0)
    gaps = arrival_gaps(4000, 50.0, 1.0, seed=0)
    assert abs(sum(gaps) / len(gaps) - 1 / 50) < 0.002  # Poisson arrivals: mean gap 1/rate
    assert arrival_gaps(3, math.inf, 1.0, seed=0) == [0.0, 0.0, 0.0]
