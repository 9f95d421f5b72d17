"""Every family and scheme builds under the GPU machine's Triton too, not only under CI's.

The GPU machine runs an older Triton (rdnac/testing/gpu_machine.py: 3.6) than CI and the development
machines (3.9); a jit helper's string default that 3.9 accepted once broke every 8B sm90 plan there, found
only after device time was spent. `make test` installs that Triton alone into a directory beside .venv
(`make gpu-triton`); this test puts it first on the path of a subprocess of the main environment's python
(torch and rdnac from the main environment, Triton from there) with its own kernel caches, and builds one-layer
plans of every case in tests/support/gpu_machine_build.py for sm90 and gfx1201 (no GPU needed: Triton
cross-compiles). A kernel that does not build fails its case with the kernel named and Triton's error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import triton
from safetensors import safe_open

from rdnac.testing import gpu_machine
from tests.support.gpu_machine_build import CASES, TARGETS

ROOT = Path(__file__).resolve().parents[1]
ENV = ROOT / gpu_machine.ENV_DIR
GPU_TRITON = f"Triton {gpu_machine.TRITON} (the GPU machine's, rdnac/testing/gpu_machine.py)"

pytestmark = pytest.mark.slow


# Kernels a case's plans must hold, beyond building: the case exists to build them under the GPU machine's Triton.
EXPECTED_KERNELS = {
    "deepseek_v3-bf16": {"_mla_cache_write_kernel", "_mla_kernel", "_mla_reduce_kernel", "_head_gemm_kernel",
                         "_moe_group_route_kernel"},
    "deepseek_v3-fp8-block": {"_mla_kernel", "_head_gemm_kernel", "_moe_fp8_block_gemm_kernel", "_quant_fp8_kernel",
                              "_fp8_block_gemm_kernel"},
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory, request):
    """(the Triton the subprocess imported, {(case, target): record}, its stderr) of one run of the cases this
    session's tests ask for: every case, or those left by -k (`-k deepseek` builds that case alone)."""
    if not (ENV / ".installed").exists():
        pytest.fail(f"building under {GPU_TRITON} requires it installed in {ENV}; got no such install; "
                    f"run `make gpu-triton` (make test does)", pytrace=False)
    # Triton's and rdnac's kernel caches live beside that Triton: the two versions' caches never mix, and a
    # second run builds only kernels whose source changed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ENV), str(ROOT)]), XDG_CACHE_HOME=str(ENV / "cache"),
               TRITON_CACHE_DIR=str(ENV / "cache" / "triton"))
    t0 = time.perf_counter()
    # this module's cases only: other modules parametrize a fixture named "case" too (with strings)
    chosen = [getattr(getattr(item, "callspec", None), "params", {}).get("case") for item in request.session.items]
    wanted = sorted({c.name for c in chosen if c in CASES})
    names = [] if wanted == sorted({c.name for c in CASES}) else wanted  # no names: every case
    proc = subprocess.run([sys.executable, "-m", "tests.support.gpu_machine_build", str(tmp_path_factory.mktemp("b")),
                           *names], cwd=ROOT, env=env, capture_output=True, text=True, timeout=2700)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print(f"\nbuilt under Triton {records[0]['triton'] if records else '?'} in {time.perf_counter() - t0:.0f} s:",
          *(f"{r['case']} {r['target']}: {r['seconds']} s" + "".join(f"\n    {x}" for x in r.get("rejected", ()))
            for r in records[1:]), sep="\n  ")
    if not records or "triton" not in records[0]:
        pytest.fail(f"the build subprocess exited {proc.returncode} before importing Triton:\n{proc.stderr[-3000:]}",
                    pytrace=False)
    return records[0], {(r["case"], r["target"]): r for r in records[1:]}, proc.stderr


def test_subprocess_imports_the_gpu_machine_triton(builds):
    imported, _, _ = builds
    assert imported["triton"] == gpu_machine.TRITON and Path(imported["triton_file"]).is_relative_to(ENV), (
        f"the build check requires {GPU_TRITON} from {ENV}; got Triton {imported['triton']} from "
        f"{imported['triton_file']}; run `make gpu-triton`")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_builds_under_the_gpu_machine_triton(builds, case, target):
    _, records, stderr = builds
    record = records.get((case.name, target))
    if record is None:
        pytest.fail(f"{case.name} for {target}: the build subprocess stopped before it:\n{stderr[-3000:]}",
                    pytrace=False)
    if not record["built"]:
        kernels = ", ".join(record["failed_kernels"]) or "the plan"
        pytest.fail(f"{kernels} does not build for {target} under {GPU_TRITON}; it does under CI's Triton "
                    f"{triton.__version__} ({case.name}):\n{record['error']}", pytrace=False)
    assert record["kernel_tritons"] == [gpu_machine.TRITON], record
    if case.scheme == "fp8-block":  # issue 29's paths: the down GEMM's own activation; on sm90 the early loads
        # (EARLY_META is the paged attention's and the fused RoPE+cache kernel's: an MLA plan has neither)
        early = {"PDL", "EARLY_WEIGHTS"} | (set() if case.name.startswith("deepseek") else {"EARLY_META"})
        wanted = {"GATED_A"} | (early if target == "sm90" else set())
        assert wanted <= set(record["paths"]), record
    missing = EXPECTED_KERNELS.get(case.name, set()) - set(record["kernel_names"])
    assert not missing, f"{case.name} for {target}: the plan lacks {sorted(missing)}; it has {record['kernel_names']}"


def test_interpreter_runs_gemms_under_the_gpu_machine_triton():
    """`rdnac run --interpret` on the GPU machine: its Triton 3.6 interpreter failed in every GEMM's `range`
    bound under NumPy 2.4 until launch.py re-set the scalars' `__index__`."""
    if not (ENV / ".installed").exists():
        pytest.fail(f"requires {GPU_TRITON} installed in {ENV}; run `make gpu-triton` (make test does)",
                    pytrace=False)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ENV), str(ROOT)]), XDG_CACHE_HOME=str(ENV / "cache"),
               TRITON_CACHE_DIR=str(ENV / "cache" / "triton"))
    proc = subprocess.run([sys.executable, "-m", "tests.support.gpu_machine_build", "--interpret"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines and lines[0]["triton"] == gpu_machine.TRITON, (proc.stdout, proc.stderr[-3000:])
    for M, err in lines[0]["interpret_gemm"].items():
        assert isinstance(err, float) and err < 1e-4, f"GEMM M={M} under {GPU_TRITON}'s interpreter: {err}"


def test_random_qwen2_checkpoint_is_what_transformers_reads(tmp_path):
    """The generator's Qwen2 layout (the q/k/v biases the cases above build with) loads into transformers with
    no tensor missing or left over, and rdnac's plan carries the biases (merged with the q/k/v weights)."""
    from transformers import AutoModelForCausalLM

    import rdnac
    from rdnac.plans import read_plan
    from rdnac.testing.fp8 import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "ckpt", arch="Qwen2ForCausalLM", hidden=256, layers=1, heads=4,
                                   kv_heads=2, head_dim=64, intermediate=384, vocab=512, scheme=None)
    _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    plan = read_plan(rdnac.compile(path, target="cpu", output=tmp_path / "p.msgpack", quiet=True))
    with safe_open(str(plan.weights_path), framework="pt") as f:
        biases = [k for k in f.keys() if k.endswith("_proj.bias")]
    assert biases == ["model.layers.0.self_attn.qkv_proj.bias"], biases
