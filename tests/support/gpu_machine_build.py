"""Build small plans of every family and scheme under whatever Triton this python imports.

tests/test_triton_gpu_machine.py runs this in a subprocess of the main environment's python with the GPU
machine's Triton (rdnac/testing/gpu_machine.py, installed by `make gpu-triton`) first on the path:

    PYTHONPATH=.gpu-triton-3.6.0:. XDG_CACHE_HOME=.gpu-triton-3.6.0/cache \\
        .venv/bin/python -m tests.support.gpu_machine_build OUT [CASE ...]

It prints one JSON line naming the Triton it imported, then one per (case, target): built or not, the
BuildError's text and the kernels it names, the Triton version each binary records, and the seconds taken.
Adding a family or scheme is one line in CASES.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

TARGETS = ("sm90", "gfx1201")

# Qwen3-8B's attention (hidden 4096, 32 heads, 8 KV heads of 128) in one layer, with intermediate and vocab cut
# to 4096: measured under Triton 3.6, the sm90 plans have the same kernels and code paths (constexprs other than
# block sizes) as the Qwen3-8B one-layer plan's, in all three schemes: split-K GEMMs with and without
# self-reduce, both split-K reduce kernels, FP8 block GEMMs, split decode attention. Width 2048 with 16 heads
# loses the self-reducing FP8 block GEMM and decode attention. The vocab only sets the logits GEMM's config
# (4096 adds a split-K one); the full vocab would write 2.5 GB of embeddings per checkpoint.
WIDTH = dict(hidden=4096, layers=1, heads=32, kv_heads=8, head_dim=128, intermediate=4096, vocab=4096)


def random_checkpoint(arch: str) -> Callable[..., Path]:
    from rdnac.testing.fp8 import write_random_checkpoint

    return partial(write_random_checkpoint, arch=arch, **WIDTH)


@dataclass(frozen=True)
class Case:
    family: str
    scheme: str  # "bf16", "fp8-block" or "fp8-tensor"
    write: Callable[..., Path]  # write(out_dir, scheme=None | "fp8-block" | "fp8-tensor") -> checkpoint dir

    @property
    def name(self) -> str:
        return f"{self.family}-{self.scheme}"


# Every family rdnac supports, with each family's own kernels: Llama/Mistral (plain attention), Qwen2 (q/k/v
# bias: the GEMMs' bias epilogues), Qwen3 (q/k norm: the fused norm-rope-cache kernel).
CASES = [
    Case("llama", "bf16", random_checkpoint("LlamaForCausalLM")),
    Case("llama", "fp8-block", random_checkpoint("LlamaForCausalLM")),
    Case("llama", "fp8-tensor", random_checkpoint("LlamaForCausalLM")),
    Case("qwen2", "bf16", random_checkpoint("Qwen2ForCausalLM")),
    Case("qwen2", "fp8-block", random_checkpoint("Qwen2ForCausalLM")),
    Case("qwen3", "bf16", random_checkpoint("Qwen3ForCausalLM")),
    Case("qwen3", "fp8-block", random_checkpoint("Qwen3ForCausalLM")),
    Case("qwen3", "fp8-tensor", random_checkpoint("Qwen3ForCausalLM")),
]


def build(case: Case, out: Path) -> list[dict]:
    """Write the case's checkpoint, compile it for every target, delete both; one record per target."""
    import rdnac
    from rdnac.compiler.build import BuildError
    from rdnac.plans import read_plan

    t0 = time.perf_counter()
    ckpt = case.write(out / case.name, scheme=None if case.scheme == "bf16" else case.scheme)
    records = [{"case": case.name, "target": "checkpoint", "seconds": round(time.perf_counter() - t0, 1)}]
    for target in TARGETS:
        t0 = time.perf_counter()
        record = {"case": case.name, "target": target}
        try:
            plan = rdnac.compile(ckpt, target=target, output=out / f"{case.name}.{target}.msgpack", quiet=True)
            kernels = read_plan(plan).body["kernels"]
            record.update(built=True, kernels=len(kernels),
                          kernel_tritons=sorted({k["triton_version"] for k in kernels}))
        except BuildError as e:
            record.update(built=False, error=str(e), failed_kernels=e.kernels)
        except Exception:  # noqa: BLE001 -- any other failure of the compile is reported the same way
            record.update(built=False, error=traceback.format_exc(limit=-8), failed_kernels=[])
        record["seconds"] = round(time.perf_counter() - t0, 1)
        records.append(record)
        for path in out.glob(f"{case.name}.{target}.*"):
            path.unlink()
    shutil.rmtree(ckpt)
    return records


def main(argv: list[str]) -> None:
    import triton

    out, names = Path(argv[0]), argv[1:]
    unknown = set(names) - {c.name for c in CASES}
    assert not unknown, f"unknown cases {sorted(unknown)}"
    print(json.dumps({"triton": triton.__version__, "triton_file": triton.__file__}), flush=True)
    for case in CASES:
        if not names or case.name in names:
            for record in build(case, out):
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
