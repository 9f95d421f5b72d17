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
    # (prefill sizes take the nearest measured shape's tile instead: see the test below)
    assert "Test GPU" not in _candidates("gemm", dict(problem, M=2048), target)[0][1]
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


def test_unmeasured_shape_at_prefill_sizes_takes_the_nearest_measured_shapes_tile(user_table):
    """The shipped sm90 table's compute-bound winners are one tile per kind on every measured shape (and
    the cost model's pick measured ~2x slower there), so an unmeasured shape at prefill sizes takes the
    nearest measured shape's config; at decode sizes, or for another dtype, the cost model still ranks."""
    target = get_target("sm90")
    small, wide = _cfg(32, 1), _cfg(64, 1)
    fp16 = {"N": 4096, "K": 4096, "dtype": "float16", "has_bias": False}
    tuning.save(user_table, "Test GPU", {}, [_entry(dict(fp16, M=2048), small, 100.0),
                                             _entry(dict(fp16, M=2048, N=16384), wide, 400.0),
                                             _entry(dict(fp16, M=1), _cfg(128, 4), 9.0)])
    for n, expected in ((5000, small), (14000, wide), (4096, small)):
        config, reason = _candidates("gemm", dict(fp16, M=1024, N=n), target)[0]
        assert config == expected, n
        if n != 4096:  # 4096 is measured itself
            assert f"nearest measured shape N={4096 if expected is small else 16384} K=4096" in reason
            assert "100.0 us" in reason or "400.0 us" in reason
    # decode sizes: no carry-over (split-K and tile widths depend on N and K)
    assert "measured" not in _candidates("gemm", dict(fp16, M=1, N=5000), target)[0][1]
    assert "measured" not in _candidates("gemm", dict(fp16, M=64, N=5000), target)[0][1]
    # another dtype or family matches nothing of these (bf16 falls back on the shipped bf16 entries)
    bf16 = _candidates("gemm", dict(fp16, M=1024, N=5000, dtype="bfloat16"), target)[0]
    assert bf16[0] != small and "nearest measured shape" in bf16[1] and "Test GPU" not in bf16[1]
    assert tuning.nearest_shape("sm90", "attention", {"phase": "prefill", "num_tokens": 2048}) is None


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


def test_prequantized_fp8_gemm_never_takes_a_quant_a_config(user_table):
    """QUANT_A quantizes x inside the GEMM; a prequantized GEMM (fp8 x from a fused norm) shares the
    measurement of its dynamic scheme and takes the fastest config that reads fp8 x instead."""
    problem = {"M": 1, "N": 4096, "K": 4096, "dtype": "bfloat16", "has_bias": False, "weight_scheme": "block",
               "act_scheme": "dynamic_group", "fp8_format": "e4m3fn", "block_size": [128, 128]}
    fused, plain = _cfg(64, 4), _cfg(128, 2)
    fused["constexprs"]["QUANT_A"] = True
    tuning.save(user_table, "Test GPU", {}, [dict(_entry(problem, fused, 9.0), key=tuning.problem_key(
        "gemm_fp8", problem), family="gemm_fp8", prequantized_config=plain)])
    target = get_target("sm90")
    assert _candidates("gemm_fp8", problem, target)[0][0] == fused
    pre = dict(problem, act_scheme="prequantized", group=128)
    assert _candidates("gemm_fp8", pre, target)[0][0] == plain


@pytest.fixture(scope="module")
def sm90_plan(tmp_path_factory):
    import rdnac
    from tests.support.checkpoints import make_checkpoint

    directory = tmp_path_factory.mktemp("tune")
    make_checkpoint("qwen3", directory / "ckpt")
    return rdnac.compile(directory / "ckpt", "sm90", directory / "p.msgpack", quiet=True, max_model_len=256,
                         max_num_seqs=8, max_num_batched_tokens=512)


def test_problems_from_plan_cover_each_regime(sm90_plan):
    from rdnac.compiler.tune import problems_from_plan

    jobs = problems_from_plan(sm90_plan)
    gemm = {(p["M"], p["N"], p["K"]) for f, p in jobs if f == "gemm"}
    # decode at 1 and at the plan's batch, prefill at its largest step (the logits read 1 row there)
    assert {m for m, _, _ in gemm} == {1, 8, 512}
    attention = [p for f, p in jobs if f == "attention"]
    assert {(p["phase"], tuning.problem_m("attention", p)) for p in attention} == \
        {("decode", 1), ("decode", 8), ("prefill", 512)}
    assert len(jobs) == len({(f, tuning.problem_key(f, p), tuning.problem_m(f, p)) for f, p in jobs})


def test_candidates_build_for_the_target_on_cpu():
    """The search's build half runs anywhere: candidates recorded, cross-compiled, resource-checked."""
    from rdnac.compiler.tune import build_candidates, candidates

    job = ("gemm", {"M": 64, "N": 64, "K": 64, "dtype": "bfloat16", "has_bias": False})
    built = build_candidates([job], "sm90", log=lambda line: None)
    assert 0 < len(built) <= len(candidates(*job))
    for index, config, binaries in built:
        assert index == 0 and binaries and all(b.target == "sm90" for b in binaries)


def test_tune_cli_needs_a_gpu_plan_and_a_gpu(sm90_plan, tmp_path, monkeypatch):
    import torch
    from click.testing import CliRunner

    import rdnac
    from rdnac.cli.main import cli
    from tests.support.checkpoints import make_checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    result = CliRunner().invoke(cli, ["tune", str(sm90_plan)])
    assert result.exit_code == 1 and "tuning requires a GPU visible to torch" in result.output
    result = CliRunner().invoke(cli, ["tune", str(sm90_plan), "--context", "256", "--context", "1024"])
    assert result.exit_code == 1 and "tuning requires a GPU visible to torch" in result.output
    result = CliRunner().invoke(cli, ["tune", str(sm90_plan), "--context", "0"])
    assert result.exit_code == 2 and "--context" in result.output
    make_checkpoint("llama", tmp_path / "ckpt")
    cpu_plan = rdnac.compile(tmp_path / "ckpt", "cpu", tmp_path / "c.msgpack", quiet=True)
    result = CliRunner().invoke(cli, ["tune", str(cpu_plan)])
    assert result.exit_code == 1 and "requires a plan compiled for a GPU target" in result.output


def test_decode_candidates_offer_self_reducing_split_k_twins():
    """Split-K without the reduce launch is only ever a measured choice: the tuner offers it next to each
    decode split config (never for M > 16, never without a split)."""
    from rdnac.compiler.tune import candidates

    decode = candidates("gemm", {"M": 1, "N": 4096, "K": 12288, "dtype": "bfloat16", "has_bias": False})
    twins = [c for c in decode if c["constexprs"].get("SELF_REDUCE")]
    splits = [c for c in decode if c["constexprs"]["SPLIT_K"] > 1 and not c["constexprs"].get("SELF_REDUCE")]
    assert twins and len(twins) == len(splits)
    assert all(c["constexprs"]["SPLIT_K"] > 1 for c in twins)
    prefill = candidates("gemm", {"M": 2048, "N": 4096, "K": 4096, "dtype": "bfloat16", "has_bias": False})
    assert not any(c["constexprs"].get("SELF_REDUCE") for c in prefill)


def test_a_wrong_candidate_is_never_timed():
    """The search compares each candidate's output with the family default's before timing it."""
    import torch

    from rdnac.compiler.tune import _disagrees

    ref = torch.randn(4, 64)
    assert _disagrees(ref + 1e-3 * ref.abs().max(), ref) == ""
    assert "max error" in _disagrees(ref * 0.5, ref)  # e.g. one of two split-K partials lost
    assert "non-finite" in _disagrees(torch.full_like(ref, float("nan")), ref)
    assert "shape" in _disagrees(ref[:2], ref)


def test_decode_attention_across_contexts_keeps_the_smallest_worst_slowdown():
    """One plan config serves every context: with several timing contexts the search keeps the config whose
    worst time against each context's fastest is smallest, not either context's winner."""
    from rdnac.compiler.tune import robust_pick

    short, wide, middle, partial = ({"constexprs": {"NUM_SPLITS": n}} for n in (4, 16, 8, 2))
    timed = {256: [(4.9, short), (5.2, middle), (6.4, wide)],
             1024: [(7.1, wide), (7.6, middle), (9.8, short), (7.0, partial)]}  # partial: not timed at 256
    config, worst = robust_pick(timed)
    assert config == middle  # 5.2 / 4.9 = 1.06 and 7.6 / 7.0 = 1.09 beat short (1.40) and wide (1.31)
    assert worst == pytest.approx(7.6 / 7.0)
    assert robust_pick({1024: timed[1024]}) == (partial, 1.0)  # one context: its fastest
    with pytest.raises(RdnacError, match="no candidate was timed at every context"):
        robust_pick({256: [(1.0, short)], 1024: [(1.0, wide)]})


@pytest.mark.slow
def test_every_shipped_sm90_entry_builds_within_the_targets_resources():
    """A table entry names a config of the kernel as it was when measured. When a kernel changes (e.g. the
    FP8 GEMM's accumulator promotion doubled its accumulator registers, 2026-12-06), an entry that no longer
    fits would be rejected at every compile: the shipped table must hold only configs that still build."""
    from rdnac.compiler.build import check_resources, compile_calls
    from rdnac.compiler.tune import _tensors, _wrapper
    from rdnac.compiler.record import RecordingLauncher

    target = get_target("sm90")
    entries = json.loads((tuning.SHIPPED_DIR / "sm90.json").read_text())["entries"]
    recorded = []  # (entry label, [KernelCall])
    for e in entries:
        (args, kw), = _tensors(e["family"], e["problem"], "meta", 1)
        rec = RecordingLauncher(pdl=True)  # as sm90 plans are built
        _wrapper(e["family"], e["problem"])(*args, **kw, config=e["config"], launcher=rec)
        recorded.append((f"{e['key']} M={e['M']} {e['config']}", rec.calls))
    binaries = compile_calls([c for _, calls in recorded for c in calls], target, quiet=True)
    failures, pos = [], 0
    for label, calls in recorded:
        for b in binaries[pos:pos + len(calls)]:
            failures += [f"{label}: {p}" for p in check_resources(b, target)]
        pos += len(calls)
    assert not failures, "\n".join(failures)
