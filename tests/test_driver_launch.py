"""The driver-API launcher (`rdnac.runtime.driver`): argument encoding on any machine; on a GPU, launches
inside a replayed CUDA graph, and a whole plan run that leaves Triton's cache empty (nothing compiled)."""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from rdnac.errors import PlanError
from rdnac.runtime.driver import HIDDEN_POINTERS, Kernel, arg_codes, pack_format


def _kernel(signature: list[str]) -> Kernel:
    """A Kernel's packing state exactly as DriverApi.load builds it, without a driver."""
    codes = arg_codes(signature)
    n = len(codes) + HIDDEN_POINTERS
    buffer = ctypes.create_string_buffer(n * 8)
    base = ctypes.addressof(buffer)
    params = (ctypes.c_void_p * n)(*[base + 8 * k for k in range(n)])
    return Kernel("k", 0, 128, 0, codes, tuple(k for k, t in enumerate(signature) if t.startswith("*")),
                  pack_format(codes), buffer, params)


def test_each_argument_gets_its_own_slot_at_the_kernel_abi_width():
    signature = ["*bf16", "i32", "i64", "fp32", "*fp8e4nv", "i1", "u64"]
    assert arg_codes(signature) == ["Q", "i", "q", "f", "Q", "b", "Q"]
    fmt = pack_format(arg_codes(signature))
    assert struct.calcsize(fmt) == 8 * len(signature)
    k = _kernel(signature)
    x = torch.zeros(4, dtype=torch.bfloat16)
    args = (x, -7, 2**40 + 3, 0.25, x, True, 2**64 - 1)
    struct.pack_into(k.fmt, k.buffer, 0, *[a.data_ptr() if i in k.tensors else a for i, a in enumerate(args)])
    raw = k.buffer.raw

    def slot(i, code):
        return struct.unpack_from("<" + code, raw, 8 * i)[0]

    assert slot(0, "Q") == x.data_ptr() and slot(4, "Q") == x.data_ptr()
    assert slot(1, "i") == -7 and slot(2, "q") == 2**40 + 3 and slot(3, "f") == 0.25
    assert slot(5, "b") == 1 and slot(6, "Q") == 2**64 - 1
    # the hidden scratch pointers Triton appends stay null
    assert [slot(len(signature) + h, "Q") for h in range(HIDDEN_POINTERS)] == [0] * HIDDEN_POINTERS
    # each params entry points at its slot
    assert [k.params[i] - ctypes.addressof(k.buffer) for i in range(len(signature) + HIDDEN_POINTERS)] == \
        [8 * i for i in range(len(signature) + HIDDEN_POINTERS)]


def test_unknown_argument_type_is_a_plan_error():
    with pytest.raises(PlanError, match="'bf16' has no driver-launch encoding"):
        arg_codes(["*fp32", "bf16"])


def test_binary_needing_scratch_or_clusters_is_refused_at_load():
    """The launcher provides no global scratch, no clusters, and needs the wave size on AMD: the load-time
    kernel check (rdnac.runtime.kernel_check, which AotLauncher's binaries go through) refuses such a binary."""
    from rdnac.runtime.kernel_check import _check_metadata
    from rdnac.targets import get_target

    def fail(requirement, got):
        raise PlanError(f"kernel m:k requires {requirement}; got {got}")

    binary = SimpleNamespace(kernel="m:k", call=SimpleNamespace(num_warps=4),
                             metadata={"name": "k", "num_warps": 4, "shared": 0, "global_scratch_size": 64})
    with pytest.raises(PlanError, match=r"kernel m:k requires no launch feature .*global_scratch_size"):
        _check_metadata(binary, "k", get_target("sm90"), fail)
    binary.metadata = {"name": "k", "num_warps": 4, "shared": 0, "num_ctas": 2}
    with pytest.raises(PlanError, match="num_ctas"):
        _check_metadata(binary, "k", get_target("sm90"), fail)
    binary.metadata = {"name": "k", "num_warps": 4, "shared": 0}
    with pytest.raises(PlanError, match="wave size"):
        _check_metadata(binary, "k", get_target("gfx1201"), fail)


@pytest.mark.gpu
def test_driver_launches_replay_in_a_cuda_graph(tmp_path):
    from rdnac.runtime.aot import AotLauncher
    from rdnac.runtime.aot import device_arch
    from tests.test_aot_gpu import _build, add, matmul

    arch, _ = device_arch(0)
    launcher = AotLauncher(_build(arch, tmp_path), "cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    x, y = torch.randn(5000, device="cuda", generator=g), torch.randn(5000, device="cuda", generator=g)
    a = torch.randn(33, 96, device="cuda", generator=g).bfloat16()  # [M, K]
    b = (torch.randn(96, 200, device="cuda", generator=g) / 10).bfloat16()  # [K, N]
    add(x, y, launcher=launcher), matmul(a, b, launcher=launcher)  # warm up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s = add(x, y, launcher=launcher)
        c = matmul(a, b, launcher=launcher)
    for _ in range(3):  # new inputs in place, replay, compare against torch
        x.copy_(torch.randn(5000, device="cuda", generator=g))
        a.copy_(torch.randn(33, 96, device="cuda", generator=g).bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(s, x + y)
        ref = (a.float() @ b.float()).bfloat16()
        assert (c.float() - ref.float()).abs().max().item() <= 2e-2


@pytest.mark.gpu
def test_loading_and_launching_compiles_nothing(tmp_path):
    """A fresh process with an empty Triton cache loads binaries and launches them; the cache stays empty
    (Triton 3.6's own launcher would have built its C stubs there)."""
    from rdnac.runtime.aot import device_arch
    from tests.test_aot_gpu import _build
    import msgpack

    arch, _ = device_arch(0)
    (tmp_path / "bins.msgpack").write_bytes(msgpack.packb(_build(arch, tmp_path / "build-cache")))
    cache = tmp_path / "run-cache"
    cache.mkdir()
    code = ("import msgpack, torch; from rdnac.runtime.aot import AotLauncher; "
            "from tests.test_aot_gpu import add; "
            f"l = AotLauncher(msgpack.unpackb(open({str(tmp_path / 'bins.msgpack')!r}, 'rb').read()), 'cuda'); "
            "x = torch.arange(1000., device='cuda'); assert torch.equal(add(x, x, launcher=l), 2 * x); "
            "torch.cuda.synchronize(); print('ok')")
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache), TRITON_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
    assert not any(cache.rglob("*")), f"run-time compile artifacts: {sorted(map(str, cache.rglob('*')))[:10]}"
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.so"))


def _chain(y, norm_w, weights, *, launcher):
    """16 dependent launches: y = linear(rms_norm(y)) x 8, split-K (with and without its reduce launch)."""
    from rdnac.kernels import gemm, rms_norm

    norm_cfg = rms_norm.default_config({"H": y.shape[1]})
    for i, w in enumerate(weights):
        y = rms_norm.rms_norm(y, norm_w, eps=1e-6, config=norm_cfg, launcher=launcher)
        cfg = {"constexprs": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_SIZE_M": 1, "SPLIT_K": 4,
                              "SELF_REDUCE": i % 2 == 0}, "num_warps": 4, "num_stages": 3}
        y = gemm.linear(y, w, config=cfg, launcher=launcher)
    return y


@pytest.mark.gpu
def test_pdl_chain_is_bit_identical_to_plain_launches_in_a_replayed_graph(tmp_path):
    """Programmatic dependent launch lets each kernel start before its predecessor ends; its
    griddepcontrol.wait must still order every read after the previous kernel's writes. A chain of
    dependent kernels launched with PDL gives the same bits as the same chain without it."""
    from rdnac.compiler.record import RecordingLauncher
    from tests.support.aot import aot_launcher

    H = 2048
    g = torch.Generator(device="cuda").manual_seed(3)
    norm_w = torch.rand(H, device="cuda", generator=g).bfloat16() + 0.5
    weights = [(torch.randn(H, H, device="cuda", generator=g) / H**0.5).bfloat16() for _ in range(8)]  # [N, K]
    launchers = {}
    for pdl in (False, True):
        rec = RecordingLauncher(pdl=pdl)
        _chain(torch.empty(4, H, dtype=torch.bfloat16, device="meta"), norm_w.to("meta"),
               [w.to("meta") for w in weights], launcher=rec)
        assert all(c.constexprs.get("PDL") is pdl for c in rec.calls)
        launchers[pdl] = aot_launcher(rec.calls, tmp_path / str(pdl), pdl=pdl)
    x = torch.randn(4, H, device="cuda", generator=g).bfloat16()  # [M, H]
    outs, graphs = {}, {}
    for pdl, launcher in launchers.items():
        _chain(x, norm_w, weights, launcher=launcher)  # warm-up outside capture
        torch.cuda.synchronize()
        graphs[pdl] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[pdl]):
            outs[pdl] = _chain(x, norm_w, weights, launcher=launcher)
    ref_fn = lambda v: v.float() * torch.rsqrt(v.float().pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    for _ in range(20):
        x.copy_(torch.randn(4, H, device="cuda", generator=g).bfloat16())
        for pdl in (False, True):
            graphs[pdl].replay()
        eager = _chain(x, norm_w, weights, launcher=launchers[True])
        torch.cuda.synchronize()
        assert torch.equal(outs[True], outs[False]), "PDL launches changed the result (an ordering race)"
        assert torch.equal(eager, outs[False])
    ref = x
    for w in weights:
        ref = (ref_fn(ref).bfloat16().float() * norm_w.float()).bfloat16()
        ref = (ref.float() @ w.float().T).bfloat16()
    err = (outs[True].float() - ref.float()).abs().max().item()
    assert err <= 0.05 * ref.float().abs().max().item(), err
