"""Tuning tables: measured configs replace the cost model's pick, per M regime, user table first."""

from __future__ import annotations

import json

import pytest

from rdnac.compiler import tuning
from rdnac.errors import RdnacError
from rdnac.compiler.passes.select_kernels import _candidates
from rdnac.targets import get_target


def _cfg(block_n: int, split: int) -> dict:
    return {"constexprs": {"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": 128, "GROUP_SIZE_M": 1, "SPLIT_K": split},
            "num_warps": 4, "num_stages": 4}


@pytest.fixture
def user_table(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tuning.load.cache_clear()
    yield tmp_path / "rdnac" / "tuned" / "sm90.json"
    tuning.load.cache_clear()


def _entry(problem: dict, config: dict, us: float) -> dict:
    return {"key": tuning.problem_key("gemm", problem), "M": problem["M"], "family": "gemm", "problem": problem,
            "config": config, "us": us, "candidates": 74}


def test_measured_config_comes_first_with_its_reason(user_table):
    problem = {"M": 1, "N": 1000, "K": 768, "dtype": "bfloat16", "has_bias": False}
    target = get_target("sm90")
    model_pick = _candidates("gemm", problem, target)[0]
    assert "measured" not in model_pick[1]
    tuned = _cfg(32, 2)  # outside the default decode space (4 stages): a measurement may widen it
    tuning.save(user_table, "Test GPU", {}, [_entry(problem, tuned, 9.5)])
    ranked = _candidates("gemm", problem, target)
    assert ranked[0][0] == tuned
    assert "measured fastest of 74 candidates on Test GPU: 9.5 us" in ranked[0][1]
    assert model_pick[0] in [c for c, _ in ranked[1:]]  # the model's ranking follows as fallbacks
    # the decode regime (M <= 16) shares the measurement; the prefill regime does not
    assert _candidates("gemm", dict(problem, M=16), target)[0][0] == tuned
    assert "measured" not in _candidates("gemm", dict(problem, M=2048), target)[0][1]
    assert "measured" not in _candidates("gemm", dict(problem, N=1024), target)[0][1]


def test_nearest_bucket_in_regime_and_user_table_wins(user_table):
    problem = {"M": 64, "N": 4096, "K": 4096, "dtype": "bfloat16"}
    tuning.save(user_table, "Test GPU", {}, [_entry(dict(problem, M=32), _cfg(64, 1), 5.0),
                                             _entry(problem, _cfg(128, 1), 6.0)])
    assert tuning.lookup("sm90", "gemm", dict(problem, M=64))["us"] == 6.0
    assert tuning.lookup("sm90", "gemm", dict(problem, M=17))["us"] == 5.0
    assert tuning.lookup("sm90", "gemm", dict(problem, M=128)) is None
    shipped = json.loads((tuning.SHIPPED_DIR / "sm90.json").read_text())
    assert shipped["device"] and shipped["entries"], "the shipped sm90 table holds measurements"
    s = shipped["entries"][0]
    tuning.save(user_table, "Mine", {}, [dict(s, config=_cfg(64, 8), us=1.0)])
    assert tuning.lookup("sm90", s["family"], s["problem"])["device"] == "Mine"


def test_bad_table_is_a_clear_error(user_table):
    user_table.parent.mkdir(parents=True)
    user_table.write_text("{not json")
    with pytest.raises(RdnacError, match="sm90.json: tuning table is not valid JSON"):
        tuning.lookup("sm90", "gemm", {"M": 1, "N": 1, "K": 1, "dtype": "bfloat16"})


def test_prequantized_fp8_gemm_uses_the_dynamic_scheme_measurement():
    base = {"M": 1, "N": 4096, "K": 4096, "dtype": "bfloat16", "weight_scheme": "block", "fp8_format": "e4m3fn",
            "block_size": [128, 128]}
    assert tuning.problem_key("gemm_fp8", dict(base, act_scheme="prequantized", group=128)) == \
        tuning.problem_key("gemm_fp8", dict(base, act_scheme="dynamic_group"))
    per_token = dict(base, weight_scheme="channel", block_size=None)
    assert tuning.problem_key("gemm_fp8", dict(per_token, act_scheme="prequantized", group=0)) == \
        tuning.problem_key("gemm_fp8", dict(per_token, act_scheme="dynamic_token"))
