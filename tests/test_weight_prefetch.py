"""Weight prefetch under programmatic dependent launch (`select_kernels.weight_prefetch`).

With PDL a decode GEMM's programs are resident while the kernel before it runs; the compiler gives
its config PREFETCH (128-byte lines per weight row that the programs ask L2 for before `gdc_wait`)
and decode attention EARLY_TRIGGER (its successor starts, and prefetches, while it runs). These
tests hold the sizing rule on 8B shapes, the instructions in the sm90 binaries, and which plans get
them; `tests/test_driver_launch.py` holds on a GPU that prefetching chains give the same bits.
"""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac.compiler.passes.select_kernels import PREFETCH_BUDGET, weight_prefetch
from rdnac.errors import RdnacError
from rdnac.kernels import gemm
from rdnac.plans import read_plan
from tests.support.checkpoints import make_checkpoint


def _cfg(block_m=16, block_n=64, block_k=128, split_k=1, **extra):
    return {"constexprs": {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_SIZE_M": 1,
                           "SPLIT_K": split_k, **extra}, "num_warps": 4, "num_stages": 3}


def _prefetched_bytes(family, problem, config):
    c = config["constexprs"]
    rows = 2 * problem["N"] if family == "gemm_gated" else problem["N"]
    return rows * c.get("SPLIT_K", 1) * -(-problem["M"] // c["BLOCK_M"]) * c["PREFETCH"] * gemm.LINE_BYTES


@pytest.mark.parametrize("family, problem, config, lines", [
    # Qwen3-8B-shaped batch-1 decode with the sm90 table's configs
    ("gemm", {"M": 1, "N": 6144, "K": 4096, "dtype": "bfloat16"}, _cfg(split_k=4, SELF_REDUCE=True), 4),  # qkv
    ("gemm", {"M": 1, "N": 4096, "K": 4096, "dtype": "bfloat16"}, _cfg(block_n=32, block_k=256), 32),  # o_proj
    ("gemm", {"M": 1, "N": 4096, "K": 12288, "dtype": "bfloat16"}, _cfg(block_n=32, split_k=4), 8),  # down
    ("gemm_gated", {"M": 1, "N": 12288, "K": 4096, "dtype": "bfloat16"}, _cfg(block_n=32), 4),  # gate_up
    ("gemm_fp8", {"M": 1, "N": 6144, "K": 4096, "dtype": "bfloat16"}, _cfg(split_k=4), 4),
    ("gemm_fp8", {"M": 1, "N": 4096, "K": 4096, "dtype": "bfloat16"}, _cfg(split_k=8), 4),  # 512 fp8 columns
    # batch 64 in one 64-row tile; two 32-row tiles read every row twice
    ("gemm", {"M": 64, "N": 4096, "K": 4096, "dtype": "bfloat16"}, _cfg(block_m=64, split_k=4), 8),
    ("gemm", {"M": 64, "N": 4096, "K": 4096, "dtype": "bfloat16"}, _cfg(block_m=32, split_k=4), 4),
    # a tiny model: a row has only two lines
    ("gemm", {"M": 1, "N": 384, "K": 128, "dtype": "bfloat16"}, _cfg(), 2),
])
def test_prefetch_is_the_largest_power_of_two_of_lines_within_budget_and_the_split(family, problem, config, lines):
    out = weight_prefetch(family, problem, config)
    assert out["constexprs"]["PREFETCH"] == lines
    assert {k: v for k, v in out["constexprs"].items() if k != "PREFETCH"} == config["constexprs"]
    assert "PREFETCH" not in config["constexprs"], "the tuned table's config must not be changed in place"
    assert _prefetched_bytes(family, problem, out) <= PREFETCH_BUDGET
    twice = {**out, "constexprs": {**out["constexprs"], "PREFETCH": 2 * lines}}
    c = config["constexprs"]
    k_per_split = -(-(-(-problem["K"] // c["SPLIT_K"])) // c["BLOCK_K"]) * c["BLOCK_K"]
    element = 1 if family == "gemm_fp8" else 2
    assert (_prefetched_bytes(family, problem, twice) > PREFETCH_BUDGET
            or 2 * lines * gemm.LINE_BYTES > min(k_per_split, problem["K"]) * element)


def test_logits_and_other_families_are_left_alone():
    logits = {"M": 1, "N": 151936, "K": 4096, "dtype": "bfloat16"}  # not one line per row fits the budget
    assert weight_prefetch("gemm", logits, _cfg()) == _cfg()
    norm = {"constexprs": {"BLOCK": 1024}, "num_warps": 4, "num_stages": 1}
    assert weight_prefetch("rms_norm", {"H": 4096}, norm) is norm
    attn = {"constexprs": {"NUM_SPLITS": 4, "BLOCK_N": 32}, "num_warps": 4, "num_stages": 2}
    assert weight_prefetch("attention", {"phase": "decode"}, attn)["constexprs"] == {**attn["constexprs"],
                                                                                     "EARLY_TRIGGER": True}


def test_sm90_binaries_prefetch_before_the_wait():
    """The PTX of each prefetching GEMM asks L2 for lines before griddepcontrol.wait; without PDL
    (every AMD target) the constexpr compiles to nothing."""
    import triton
    from triton.compiler import ASTSource

    from rdnac.kernels import gemm_fp8, gemm_gated
    from rdnac.kernels.binaries import COMPILE_OPTIONS, decode_constexpr, triton_attrs, triton_signature
    from rdnac.kernels.launch import RecordingLauncher, resolve_kernel
    from rdnac.targets import get_target

    def ptx_of(pdl):
        rec = RecordingLauncher(pdl=pdl)
        x = torch.empty(1, 512, dtype=torch.bfloat16, device="meta")
        gemm.linear(x, torch.empty(256, 512, dtype=torch.bfloat16, device="meta"),
                    config=_cfg(split_k=2, PREFETCH=2), launcher=rec)
        gemm_gated.linear_gated_act(x, torch.empty(512, 512, dtype=torch.bfloat16, device="meta"),
                                    config=_cfg(block_n=32, PREFETCH=2), launcher=rec)
        w8 = torch.empty(256, 512, dtype=torch.float8_e4m3fn, device="meta")
        gemm_fp8.linear_fp8(x, w8, torch.empty(2, 4, device="meta"), weight_scheme="block",
                            act_scheme="dynamic_group", fp8_format="e4m3fn", block_size=[128, 128],
                            config=_cfg(PREFETCH=2), launcher=rec)
        out = {}
        for call in rec.calls:
            if "PREFETCH" not in call.constexprs:
                continue
            kernel = resolve_kernel(call.kernel)
            src = ASTSource(fn=kernel, signature=triton_signature(kernel, call), attrs=triton_attrs(kernel, call),
                            constexprs={k: decode_constexpr(v) for k, v in call.constexprs.items()})
            compiled = triton.compile(src, target=get_target("sm90").gpu_target(),
                                      options={"num_warps": call.num_warps, "num_stages": call.num_stages,
                                               **COMPILE_OPTIONS})
            out[call.kernel.rpartition(":")[2]] = (call.constexprs["LINE"], compiled.asm["ptx"])
        return out

    with_pdl = ptx_of(True)
    assert set(with_pdl) == {"_gemm_kernel", "_gemm_gated_kernel", "_fp8_block_gemm_kernel"}
    for name, (line, ptx) in with_pdl.items():
        assert line == (128 if name.startswith("_fp8") else 64), name  # elements per 128-byte line
        first_prefetch, wait = ptx.find("prefetch.global.L2"), ptx.find("griddepcontrol.wait")
        assert 0 <= first_prefetch < wait, f"{name}: no L2 prefetch before the wait"
    for name, (_, ptx) in ptx_of(False).items():
        assert "prefetch" not in ptx and "griddepcontrol" not in ptx, name


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3") / "ckpt"
    make_checkpoint("qwen3", d, hidden_size=128, intermediate_size=384, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32)
    return d


def _marks(plan_path):
    """{(node op, step key): (PREFETCH, EARLY_TRIGGER)} over the plan's program."""
    plan = read_plan(plan_path)
    ops = {n["name"]: n["op"] for n in plan.body["graph"]["nodes"]}
    marks = {}
    for node, per_key in plan.body["program"].items():
        for key, choice in per_key.items():
            c = choice["config"]["constexprs"]
            marks[(node, ops[node], key)] = (c.get("PREFETCH"), c.get("EARLY_TRIGGER"))
    return plan, marks


def test_sm90_plan_prefetches_at_decode_only_and_can_be_disabled(qwen3_dir, tmp_path):
    plan, marks = _marks(rdnac.compile(qwen3_dir, target="sm90", output=tmp_path / "q.msgpack", quiet=True))
    decode = {k: v for k, v in marks.items() if k[2].startswith("decode:")}
    gemms = {k[0].rpartition(".")[2]: v[0] for k, v in decode.items() if k[1] in ("linear", "linear_gated_act")}
    # K = 128: a row is two lines; down_proj's K = 384 is six, of which the power of two is four
    assert gemms == {"qkv_proj": 2, "o_proj": 2, "gate_up_proj": 2, "down_proj": 4}
    assert {v[1] for k, v in decode.items() if k[1] == "attention"} == {True}
    assert all(v == (None, None) for k, v in marks.items() if k[2].startswith("prefill:"))
    binaries = [b for b in plan.body["kernels"] if b["call"]["constexprs"].get("PREFETCH")]
    assert binaries and all(b["call"]["constexprs"]["PDL"] is True for b in binaries)
    steps = [d for d in plan.body["decisions"] if d["pass"] == "weight_prefetch"]
    assert len(steps) == 1 and "decode GEMMs prefetch up to 16 MiB" in steps[0]["action"]

    for options, action in (({"disable_passes": ("weight_prefetch",)}, "skipped"), ({"pdl": False}, "off")):
        plan, marks = _marks(rdnac.compile(qwen3_dir, target="sm90", output=tmp_path / "off.msgpack", quiet=True,
                                           **options))
        assert all(v == (None, None) for v in marks.values()), options
        assert [d["action"] for d in plan.body["decisions"] if d["pass"] == "weight_prefetch"] == [action]


def test_unknown_disable_pass_names_the_passes(tmp_path):
    with pytest.raises(RdnacError, match=r"no pass named 'fuse_gated_linaer'.*fuse_gated_linear.*weight_prefetch"):
        rdnac.compile("demo:smollm2", target="sm90", output=tmp_path / "x.msgpack",
                      disable_passes=("fuse_gated_linaer",))
