"""bench/prefill_attention29.py (issue 29's prefill attention TFLOP/s, new kernel against the one before it)
runs end to end on the cpu at tiny widths, so the device call cannot die on a typo; its FLOP count."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import prefill_attention29 as bench  # noqa: E402


def test_causal_pairs_count_whole_prompts_and_chunks_after_a_prefix():
    assert bench.causal_pairs(0, 2048) == 2048 * 2049 // 2
    assert bench.causal_pairs(8192, 8192) == 8192 * 8192 + 8192 * 8193 // 2
    assert bench.causal_pairs(5, 1) == 6  # one new token sees the 5 cached ones and itself


def test_dry_run_checks_and_times_both_kernels(tmp_path):
    with pytest.raises(SystemExit) as done:
        bench.main(["--tiny", "--out", str(tmp_path), "--cases", "40", "30+50"])
    assert done.value.code == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()][1:]
    assert {r["kernel"] for r in records} == {"new", "base"} and {r["case"] for r in records} == {"40", "30+50"}
    for r in records:
        assert "error" not in r, r
        assert r["max_err"] <= 2e-2 and r["us"] > 0
        assert r["flops"] == 4 * 4 * 64 * bench.causal_pairs(r["prefix"], r["tokens"])
    assert "| 30+50 | base |" in (tmp_path / "table.md").read_text()
