"""Cross-compilation in CI: SmolLM2 (GGUF) and a tiny Qwen3 for every AMD target and sm90.

Every kernel of every plan fits its target's LDS and spills nothing; GEMMs use
matrix instructions where the hardware has them. Compile times are printed
(cold in CI, whose cache starts empty) for the closing note and BENCHMARKS.md.
"""

from __future__ import annotations

import time

import pytest

import rdnac
from rdnac.compiler.build import check_resources
from rdnac.kernels import registry
from rdnac.plans.binaries import KernelBinary
from rdnac.plans import read_plan
from tests.support.checkpoints import make_checkpoint

TARGETS = ("gfx1201", "gfx1151", "gfx942", "gfx950", "sm90")
MATRIX_GEMM_TARGETS = ("gfx1201", "gfx942", "gfx950", "sm90")


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3") / "ckpt"
    make_checkpoint("qwen3", d, hidden_size=128, intermediate_size=384, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32)
    return d


def _check_plan(path, target):
    plan = read_plan(path)
    assert plan.header["target"] == target and plan.header["triton_version"]
    binaries = [KernelBinary.from_dict(k) for k in plan.body["kernels"]]
    assert binaries
    for b in binaries:
        assert check_resources(b, target) == [], b.key
    gemms = [b for b in binaries if b.kernel.endswith("gemm:_gemm_kernel")]
    assert gemms
    if target in MATRIX_GEMM_TARGETS:
        for b in gemms:
            assert b.resources.matrix_instructions, f"{target}: {b.key} uses no matrix instruction"
    nodes = {n["name"] for n in plan.body["graph"]["nodes"] if n["op"] != "split"}  # split: views, no kernel
    assert set(plan.body["program"]) == nodes  # every other node has a kernel for every step key
    keys = {k for choices in plan.body["program"].values() for k in choices}
    assert {"decode:1", "decode:64", "prefill:2048"} <= keys
    names = {c["kernel"] for choices in plan.body["program"].values() for c in choices.values()}
    assert all(callable(registry.wrapper(name)) for name in names)  # resolved as the runtime does, by the registry
    return binaries


@pytest.mark.parametrize("target", TARGETS)
def test_smollm2_compiles_for_target(target, tmp_path):
    started = time.perf_counter()
    path = rdnac.compile("demo:smollm2", target=target, output=tmp_path / f"smol.{target}.msgpack", quiet=True)
    seconds = time.perf_counter() - started
    binaries = _check_plan(path, target)
    print(f"\nSmolLM2 -> {target}: {seconds:.1f} s, {len(binaries)} kernel binaries")
    assert seconds < 120, f"compiling SmolLM2 for {target} took {seconds:.1f} s; budget 120 s"


@pytest.mark.parametrize("target", TARGETS)
def test_tiny_qwen3_compiles_for_target(target, qwen3_dir, tmp_path):
    path = rdnac.compile(qwen3_dir, target=target, output=tmp_path / f"q.{target}.msgpack", quiet=True)
    _check_plan(path, target)


def test_warm_compile_is_fast(tmp_path):
    rdnac.compile("demo:smollm2", target="sm90", output=tmp_path / "a.msgpack", quiet=True)
    started = time.perf_counter()
    rdnac.compile("demo:smollm2", target="sm90", output=tmp_path / "b.msgpack", quiet=True)
    seconds = time.perf_counter() - started
    print(f"\nSmolLM2 -> sm90 with a warm kernel cache: {seconds:.1f} s")
    assert seconds < 15, f"warm compile took {seconds:.1f} s"


def test_unknown_target_lists_targets(tmp_path):
    from rdnac.errors import TargetError

    with pytest.raises(TargetError, match="gfx1201") as info:
        rdnac.compile("demo:smollm2", target="gfx9999", output=tmp_path / "x.msgpack")
    assert "gfx9999" in str(info.value) and "sm90" in str(info.value)


def test_sm90_plans_record_early_metadata_loads(qwen3_dir, tmp_path):
    """With PDL, sm90 plans build decode attention and q/k-norm + RoPE + cache with EARLY_META and say so
    in the log; --disable-pass early_metadata_loads and --no-pdl build none; AMD targets have no PDL."""
    def early(path):
        plan = read_plan(path)
        kernels = [k for k in plan.body["kernels"]
                   if k["kernel"].endswith((":_decode_kernel", ":_qk_norm_rope_cache_kernel"))]
        flags = {k["call"]["constexprs"].get("EARLY_META", False) for k in kernels}
        launch = [d["action"] for d in plan.body["decisions"]
                  if d["pass"] == "launch" and "early metadata" in d["action"]]
        return plan.body["runtime"]["early_meta"], flags, launch

    assert early(rdnac.compile(qwen3_dir, target="sm90", output=tmp_path / "on.msgpack", quiet=True)) == \
        (True, {True}, ["early metadata loads on"])
    assert early(rdnac.compile(qwen3_dir, target="sm90", output=tmp_path / "off.msgpack", quiet=True,
                               disable_passes=("early_metadata_loads",))) == \
        (False, {False}, ["early metadata loads off"])
    assert early(rdnac.compile(qwen3_dir, target="sm90", output=tmp_path / "nopdl.msgpack", quiet=True,
                               pdl=False)) == (False, {False}, [])
    assert early(rdnac.compile(qwen3_dir, target="gfx1201", output=tmp_path / "amd.msgpack", quiet=True)) == \
        (False, {False}, [])
