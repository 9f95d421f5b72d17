"""`rdnac bench`'s modes on a machine without a GPU: serving runs (tests/test_cli.py), step timings and the
harness refuse in one line, and options of one mode given to another are usage errors."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from rdnac.cli.main import cli

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


@no_gpu
@pytest.mark.parametrize("args,what", [
    (["PLAN", "--decode", "--batch", "1,64", "--context", "256", "--prefill", "2048"], "--decode/--prefill"),
    (["PLAN", "--prefill", "2048"], "--decode/--prefill"),
    (["--shape", "tiny", "--scheme", "fp8-block", "--layers", "1"], "--shape"),
])
def test_gpu_timings_refuse_in_one_line_without_a_gpu(args, what, tmp_path):
    args = [str(tmp_path / "p.msgpack") if a == "PLAN" else a for a in args]
    result = CliRunner().invoke(cli, ["bench", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: rdnac bench {what}") and "requires a CUDA/HIP GPU" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # refused before measuring anything


@pytest.mark.parametrize("args,message", [
    (["PLAN", "--ab-pdl"], "--ab-pdl require --shape"),
    (["PLAN", "--scheme", "bf16", "--peers"], "--scheme, --peers require --shape"),
    (["PLAN", "--shape", "tiny"], "requires PLAN or --shape, not both"),
    ([], "requires PLAN"),
    (["--shape", "qwen9-8b"], "requires one of"),
    (["PLAN", "--decode", "--batch", "1,x"], "requires comma-separated integers"),
    (["PLAN", "--decode", "--batch", "0"], "requires positive integers"),
])
def test_options_of_another_mode_are_usage_errors(args, message, tmp_path):
    args = [str(tmp_path / "p.msgpack") if a == "PLAN" else a for a in args]
    result = CliRunner().invoke(cli, ["bench", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output


def test_help_names_the_three_modes():
    result = CliRunner().invoke(cli, ["bench", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in ("--concurrency", "--decode", "--prefill", "--shape", "--ab-disable-pass", "--timeline"):
        assert option in result.output


def test_batch_lists_parse_commas_and_repeats():
    from rdnac.cli.bench import _IntList, _flat

    ints = _IntList()
    assert _flat([ints.convert("1,4", None, None), ints.convert("16", None, None)]) == (1, 4, 16)


def test_harness_imports_on_cpu():
    from rdnac.bench import harness

    cfg = harness.BenchConfig(shapes=("qwen3-8b",), schemes=("bf16", "fp8-block"))
    assert cfg.batch == (1, 4, 16, 64) and cfg.context == 256 and cfg.prefill == (512, 2048)
