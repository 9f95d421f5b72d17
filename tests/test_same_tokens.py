"""Issue 22's acceptance on cpu: one seeded request (temperature 0.8) gives identical tokens through the
Python API, `rdnac run` and `rdnac serve`, alone and inside a batch of 17 other requests; and unset params
come from the plan's generation_config everywhere."""

from __future__ import annotations

import hashlib
import shutil

import fastapi  # noqa: F401  (installed by make: rdnac[serve])
import msgpack
from click.testing import CliRunner

import rdnac
from rdnac import SamplingParams
from rdnac.cli.main import cli
from rdnac.runtime.sampling_params import generation_defaults
from tests.support.checkpoints import make_checkpoint
from tests.support.same_tokens import PROMPT, cli_text, check_same_tokens


def test_seed_gives_the_same_tokens_everywhere(tmp_path):
    make_checkpoint("llama", tmp_path / "ckpt")
    plan = rdnac.compile(tmp_path / "ckpt", target="cpu", output=tmp_path / "llama.msgpack", quiet=True)
    tokens = check_same_tokens(rdnac.load(plan), plan)
    assert len(tokens) > 1


def test_generation_config_sets_the_defaults_everywhere(tmp_path):
    """Params a request leaves unset come from the plan's generation_config, by HF's rules, the same way for
    the Python API and `rdnac run` (the server too: tests/test_serve_hardening.py)."""
    assert generation_defaults({}) == {"temperature": 0.0}  # nothing asked: greedy
    assert generation_defaults({"do_sample": False, "temperature": 0.7, "top_k": 5}) == {"temperature": 0.0}
    assert generation_defaults({"do_sample": True}) == {"temperature": 1.0}
    assert generation_defaults({"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0,
                                "repetition_penalty": 1.1, "max_new_tokens": 9}) == \
        {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0, "repetition_penalty": 1.1}
    params = SamplingParams.from_generation_config({"temperature": 0.6, "top_p": 0.9}, max_tokens=5, temperature=None)
    assert (params.temperature, params.top_p, params.max_tokens) == (0.6, 0.9, 5)
    assert SamplingParams.from_generation_config({"temperature": 0.6}, temperature=0.0).temperature == 0.0

    make_checkpoint("llama", tmp_path / "ckpt")
    plain = rdnac.compile(tmp_path / "ckpt", target="cpu", output=tmp_path / "plain.msgpack", quiet=True)
    doc = msgpack.unpackb(plain.read_bytes(), raw=False)
    body = msgpack.unpackb(doc["body"], raw=False, strict_map_key=False)
    body["generation_config"].update(do_sample=True, temperature=0.8, top_k=40)
    doc["body"] = msgpack.packb(body, use_bin_type=True)
    doc["body_sha256"] = hashlib.sha256(doc["body"]).hexdigest()
    plan = tmp_path / "sampled" / "plan.msgpack"
    plan.parent.mkdir()
    plan.write_bytes(msgpack.packb(doc, use_bin_type=True))
    shutil.copy(plain.with_name(doc["header"]["weights"]["file"]), plan.parent)

    llm = rdnac.load(plan)
    defaults = llm.default_params(max_tokens=16, seed=1234)
    assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.8, 40, 1.0)
    explicit = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.8, top_k=40, seed=1234))[0]
    assert llm.generate([PROMPT], defaults)[0].token_ids == explicit.token_ids
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=16))[0]
    assert explicit.token_ids != greedy.token_ids  # the config's sampling did apply
    assert cli_text(plan, "--top-k", "40") == explicit.text  # cli_text gives temperature 0.8 and the seed
    result = CliRunner().invoke(cli, ["run", str(plan), "--prompt", PROMPT, "--max-tokens", "16", "--seed", "1234"])
    assert result.exit_code == 0, result.output
    assert result.stdout[:-1] == explicit.text, "rdnac run did not take the plan's generation_config"
    result = CliRunner().invoke(cli, ["run", str(plain), "--prompt", PROMPT, "--max-tokens", "16", "--seed", "1234"])
    assert result.stdout[:-1] == rdnac.load(plain).generate([PROMPT], SamplingParams(max_tokens=16))[0].text
