"""The CLI and compile under bad input (issue 23): one line, never a traceback; no silent clamps; the
interactive chat through a real pseudo-terminal; a GPU plan on a CPU machine; verify of an FP8 plan."""

from __future__ import annotations

import json
import os
import pty
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch
from click.testing import CliRunner

import rdnac
from rdnac import SamplingParams
from rdnac.cli.main import cli
from rdnac.errors import PlanError, RdnacError, RdnacWarning, RequestError
from tests.support.checkpoints import make_checkpoint, reference_greedy

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt") / "llama"
    make_checkpoint("llama", directory)
    return directory


@pytest.fixture(scope="module")
def plan(checkpoint, tmp_path_factory) -> Path:
    return rdnac.compile(checkpoint, output=tmp_path_factory.mktemp("plan") / "llama.msgpack", quiet=True)


def _one_line_error(args, **kwargs) -> str:
    result = CliRunner().invoke(cli, args, **kwargs)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an exception click caught
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _variant(checkpoint: Path, tmp_path: Path, edit_config=None) -> Path:
    target = tmp_path / "variant"
    shutil.copytree(checkpoint, target)
    if edit_config is not None:
        config = json.loads((target / "config.json").read_text())
        edit_config(config)
        (target / "config.json").write_text(json.dumps(config))
    return target


# ---------------------------------------------------------------- 6: one line, never a traceback


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("key", ["num_attention_heads", "hidden_size", "vocab_size", "num_hidden_layers",
                                 "intermediate_size"])
def test_config_without_a_required_key_names_the_file_and_key(tmp_path, family, key):
    directory = tmp_path / family
    make_checkpoint(family, directory, num_hidden_layers=1)
    config = json.loads((directory / "config.json").read_text())
    del config[key]
    (directory / "config.json").write_text(json.dumps(config))
    out = tmp_path / "p.msgpack"
    line = _one_line_error(["compile", str(directory), "-o", str(out)])
    assert "config.json" in line and repr(key) in line, line
    assert not out.exists()


def test_config_size_of_the_wrong_kind_names_the_key(checkpoint, tmp_path):
    for value in ("72", 0, None, 7.5):
        d = _variant(checkpoint, tmp_path / str(value), lambda c: c.update(hidden_size=value))
        line = _one_line_error(["compile", str(d), "-o", str(tmp_path / "p.msgpack")])
        assert "config.json" in line and "hidden_size" in line, line


def test_config_that_is_not_an_object(checkpoint, tmp_path):
    d = _variant(checkpoint, tmp_path)
    (d / "config.json").write_text("[1, 2]")
    assert "config.json: requires a JSON object" in _one_line_error(["compile", str(d), "-o", str(tmp_path / "p")])


def test_output_directory_missing_or_a_file(checkpoint, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, says in ((tmp_path / "missing" / "p.msgpack", "does not exist"),
                      (a_file / "p.msgpack", "is a file")):
        line = _one_line_error(["compile", str(checkpoint), "-o", str(out)])
        assert str(out) in line and says in line, line
    with pytest.raises(RdnacError, match="got a directory"):  # the CLI's -o refuses a directory itself
        rdnac.compile(checkpoint, output=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_output_directory_unwritable(checkpoint, tmp_path):
    """Refused before compiling; as root (which ignores permission bits) /sys stands in for a read-only dir."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        candidates = [locked, Path("/sys")]
        unwritable = next(d for d in candidates if not _can_create_in(d))
        line = _one_line_error(["compile", str(checkpoint), "-o", str(unwritable / "p.msgpack")])
        assert str(unwritable) in line and "write" in line, line
    finally:
        locked.chmod(0o755)


def _can_create_in(directory: Path) -> bool:
    try:
        (directory / ".rdnac-probe").write_bytes(b"")
    except OSError:
        return False
    (directory / ".rdnac-probe").unlink()
    return True


def test_write_failure_is_one_line_naming_the_plan(checkpoint, tmp_path):
    """The real CLI with a file size limit (writes past it fail with EFBIG, as a full disk fails with ENOSPC)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "out" / "p.msgpack"
    out.parent.mkdir()
    result = subprocess.run([sys.executable, "-m", "rdnac.cli.main", "compile", str(checkpoint), "-o", str(out)],
                            capture_output=True, text=True, env=ENV, preexec_fn=limit, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {out}: writing the plan") and "File too large" in lines[0], lines


def test_corrupt_tokenizer_json_is_refused_at_compile(checkpoint, tmp_path):
    d = _variant(checkpoint, tmp_path)
    (d / "tokenizer.json").write_text('{"model": 5')
    out = tmp_path / "p.msgpack"
    line = _one_line_error(["compile", str(d), "-o", str(out)])
    assert "tokenizer.json" in line and "tokenizers library" in line, line
    assert not out.exists()


def test_corrupt_tokenizer_in_a_plan_is_one_line_at_load(plan, tmp_path):
    import hashlib

    doc = msgpack.unpackb(plan.read_bytes(), raw=False)
    body = msgpack.unpackb(doc["body"], raw=False, strict_map_key=False)
    body["tokenizer"]["json"] = body["tokenizer"]["json"][:100]
    doc["body"] = msgpack.packb(body, use_bin_type=True)
    doc["body_sha256"] = hashlib.sha256(doc["body"]).hexdigest()
    bad = tmp_path / plan.name
    bad.write_bytes(msgpack.packb(doc, use_bin_type=True))
    shutil.copy(plan.with_name("llama.weights.safetensors"), tmp_path)
    with pytest.raises(PlanError, match="tokenizer"):
        rdnac.load(bad)
    assert "tokenizer" in _one_line_error(["run", str(bad), "--prompt", "hi"])


@pytest.mark.parametrize("option,value", [("--temperature", "nan"), ("--temperature", "inf"),
                                          ("--temperature", "-1"), ("--seed", str(2**64)),
                                          ("--seed", str(-2**63 - 1))])
def test_sampling_options_out_of_range_are_one_line(plan, option, value):
    line = _one_line_error(["run", str(plan), "--prompt", "hi", "--max-tokens", "2", option, value])
    assert option.removeprefix("--") in line and "requires" in line, line


def test_largest_seed_is_accepted(plan):
    """Seeds are 64 bits, read as signed or unsigned (OpenAI's API sends int64): -1 and 2**64 - 1 are the
    same seed and give the same tokens; one bit more is refused."""
    llm = rdnac.load(plan)
    out = llm.generate(["hi"], SamplingParams(max_tokens=3, temperature=1.0, seed=2**64 - 1))[0]
    same = llm.generate(["hi"], SamplingParams(max_tokens=3, temperature=1.0, seed=-1))[0]
    assert len(out.token_ids) == 3 and same.token_ids == out.token_ids
    for seed in (2**64, -2**63 - 1):
        with pytest.raises(RequestError, match="seed requires"):
            SamplingParams(seed=seed)


# ---------------------------------------------------------------- 7: a plan without a tokenizer


def test_plan_without_a_tokenizer_takes_token_ids_and_refuses_text_in_one_line(tmp_path):
    model = make_checkpoint("llama", tmp_path / "bare", with_tokenizer=False)
    plan = rdnac.compile(tmp_path / "bare", output=tmp_path / "bare.msgpack", quiet=True)
    llm = rdnac.load(plan)
    prompt = [5, 17, 42, 9]
    out = llm.generate([prompt], SamplingParams(max_tokens=5))[0]
    assert out.token_ids == reference_greedy(model, prompt, 5) and out.text == ""
    for args in (["--prompt", "hi"], ["--chat", "hi"]):
        line = _one_line_error(["run", str(plan), *args])
        assert "requires a tokenizer" in line and "token ids" in line, line


# ---------------------------------------------------------------- 10: clamps say so, once


def test_max_model_len_above_the_positions_warns_naming_both(checkpoint, tmp_path):
    with pytest.warns(RdnacWarning, match="--max-model-len 5000 is above the model's 256 positions"):
        path = rdnac.compile(checkpoint, output=tmp_path / "a.msgpack", max_model_len=5000, quiet=True)
    assert rdnac.load(path).max_model_len == 256
    result = CliRunner().invoke(cli, ["compile", str(checkpoint), "-o", str(tmp_path / "b.msgpack"),
                                      "--max-model-len", "5000"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "5000" in warnings[0] and "256" in warnings[0], result.stderr


def test_max_tokens_beyond_the_context_warns_once_naming_both(plan):
    result = CliRunner().invoke(cli, ["run", str(plan), "--prompt", "hi", "--max-tokens", "5000"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "--max-tokens 5000" in warnings[0] and "254" in warnings[0] and "256" in warnings[0], warnings
    result = CliRunner().invoke(cli, ["run", str(plan), "--chat", "--max-tokens", "5000"], input="hi\n/reset\nhi\n\n")
    assert result.exit_code == 0, result.output  # two turns, each clamped, one warning
    assert result.stderr.count("warning: --max-tokens 5000") == 1, result.stderr
    quiet = CliRunner().invoke(cli, ["run", str(plan), "--prompt", "hi", "--max-tokens", "4"])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr, quiet.stderr


# ---------------------------------------------------------------- 11: interactive chat in a terminal


def _run_in_pty(args: list[str], typed: str, timeout: float = 240) -> str:
    """Run the rdnac CLI attached to a pseudo-terminal, typing `typed`; returns everything it showed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "rdnac.cli.main", *args], stdin=slave, stdout=slave,
                            stderr=slave, env=ENV, close_fds=True)
    os.close(slave)
    os.write(master, typed.encode())
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=10) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def test_interactive_chat_in_a_terminal_sends_each_turn_without_its_newline(plan):
    llm = rdnac.load(plan)
    params = SamplingParams(max_tokens=6)

    def reply(*turns):
        messages = []
        for i, turn in enumerate(turns):
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": turn})
        return llm.chat(messages, params)[0].text

    first = reply("hi")
    second = reply("hi", first, "more")
    assert first != reply("hi\n") or second != reply("hi\n", reply("hi\n"), "more\n"), \
        "the newline must change the answer for this test to see it"
    shown = _run_in_pty(["run", str(plan), "--chat", "--max-tokens", "6"], "hi\nmore\n\n")
    assert "chat with the model" in shown
    assert f"{first}\n" in shown and f"{second}\n" in shown, (first, second, shown)


# ---------------------------------------------------------------- 12: a GPU plan on a CPU machine


@pytest.fixture(scope="module")
def gpu_plan(checkpoint, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("gpu") / "one_layer"
    make_checkpoint("llama", directory, num_hidden_layers=1)
    return rdnac.compile(directory, target="sm90", output=directory.parent / "g.msgpack", quiet=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU is told")
def test_gpu_plan_without_a_gpu_gets_one_message_that_says_what_works(gpu_plan):
    lines = {_one_line_error(["run", str(gpu_plan), "--prompt", "hi", *device])
             for device in ([], ["--device", "cpu"], ["--device", "cuda"])}
    assert len(lines) == 1, lines  # the same advice whatever --device said: nothing circular
    line = lines.pop()
    assert "--interpret" in line and "--target cpu" in line and "sm90" in line, line
    assert "--device" not in line, line


def test_interpret_says_it_is_slow_and_shows_progress(gpu_plan):
    expected = rdnac.load(gpu_plan, interpret=True).generate(["hi"], SamplingParams(max_tokens=2))[0].text
    result = CliRunner().invoke(cli, ["run", str(gpu_plan), "--interpret", "--prompt", "hi", "--max-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "slow" in result.stderr and "Triton interpreter" in result.stderr, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("rdnac: token ")]
    assert [line.split(" after ")[0] for line in progress] == ["rdnac: token 1 of at most 2",
                                                                "rdnac: token 2 of at most 2"], result.stderr
    assert result.stdout == expected + "\n"


# ---------------------------------------------------------------- 14: verify of an FP8 plan, file modes


def test_verify_of_an_fp8_plan_uses_a_quantized_tolerance(checkpoint, tmp_path):
    plan = rdnac.compile(checkpoint, output=tmp_path / "f8.msgpack", quantize="fp8", quiet=True)
    result = CliRunner().invoke(cli, ["verify", str(plan), "--against", str(checkpoint)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "tolerance 0.15: the plan's weights are quantized (fp8-channel" in result.output, result.output
    strict = CliRunner().invoke(cli, ["verify", str(plan), "--against", str(checkpoint), "--atol", "1e-4"])
    assert strict.exit_code == 1  # the errors are real FP8 rounding: a float32 tolerance still fails them


def test_weights_file_mode_matches_the_plan(checkpoint, tmp_path):
    old = os.umask(0o022)
    try:
        plan = rdnac.compile(checkpoint, output=tmp_path / "m.msgpack", quiet=True)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (plan, plan.with_name("m.weights.safetensors"))}
    assert set(modes.values()) == {0o644}, {k: oct(v) for k, v in modes.items()}
