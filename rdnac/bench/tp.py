"""Tensor-parallel decode against one GPU (issue 28): `python -m rdnac.bench.tp --out DIR`.

In one process and one run: a random checkpoint of a named shape (bf16,
`rdnac.testing.fp8`), compiled for sm90 with --tp N and without; decode TPOT
with graphs at each batch size (context 256), the --tp N plan first (rank 0
here, ranks 1.. started by `rdnac.load`, one GPU each), then the one-rank
plan on GPU 0 once the ranks have stopped. Per TP row: the bytes one rank
reads per step and its bandwidth, the total over the ranks, and the
all-reduce share of a step: NCCL's kernel time within a replayed decode
graph (torch.profiler on rank 0) over the replay's span, first kernel start
to last kernel end. One JSON line per measurement, printed and appended to
OUT/results.jsonl (as `rdnac.bench.harness`).

`--dry-run` runs the same flow on the cpu target over gloo at the sizes given
(no GPU, no profile): for checking the script before a device call.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import torch

import rdnac
from rdnac.bench.decode import copy_bandwidth, decode_bytes
from rdnac.bench.harness import ROOT, Recorder, environment, random_checkpoint, rdnac_cmd, timed_subprocess
from rdnac.runtime.model_runner import StepEntry
from rdnac.testing.fp8 import SHAPES


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _entries(llm, batch: int, context: int) -> list[StepEntry]:
    per_seq = -(-(context + 1) // llm.runner.block_size)
    return [StepEntry([1] * (context + 1), llm.engine.block_manager.take_blocks(per_seq), context, context + 1)
            for _ in range(batch)]


def _tpot(llm, entries: list[StepEntry], device: str, steps: int) -> float:
    for _ in range(5):
        llm.runner.execute(entries)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        llm.runner.execute(entries)
    _sync(device)
    return (time.perf_counter() - start) / steps


def allreduce_share(llm, entries: list[StepEntry], replays: int = 5) -> dict:
    """NCCL kernel time per replayed decode step against the step's span (rank 0's GPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            llm.runner.execute(entries)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    if not kernels:
        return {"allreduce_share": None, "why": "the profiler saw no kernels of the replayed graphs"}
    nccl = [e for e in kernels if "nccl" in e.name.lower()]
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    nccl_us = sum(e.time_range.end - e.time_range.start for e in nccl)
    return {"allreduce_us_per_step": round(nccl_us / replays, 1), "allreduce_launches_per_step": len(nccl) // replays,
            "profiled_span_us_per_step": round(span / replays, 1),
            "allreduce_share": round(nccl_us / span, 3) if span else None}


def measure(plan: Path, tp: int, args, emit, copy_gbps: float | None) -> None:
    device = "cpu" if args.dry_run else "cuda"
    started = time.perf_counter()
    llm = rdnac.load(plan, device=device, num_blocks=args.num_blocks, max_num_seqs=max(args.batch))
    emit({"tp": tp, "load_s": round(time.perf_counter() - started, 1),
          "graphs": getattr(llm.runner.graphs, "buckets", None)})
    try:
        for batch in args.batch:
            entries = _entries(llm, batch, args.context)
            seconds = _tpot(llm, entries, device, args.steps)
            per_rank = decode_bytes(llm, batch, args.context)  # this rank's weights and state
            record = {"engine": "rdnac", "shape": args.shape, "scheme": "bf16", "tp": tp, "batch": batch,
                      "context": args.context, "tpot_ms": round(seconds * 1e3, 3),
                      "tokens_per_s": round(batch / seconds, 1), "per_rank_bytes_GB": round(per_rank / 1e9, 3),
                      "per_rank_GBps": round(per_rank / seconds / 1e9, 1),
                      "total_GBps": round(tp * per_rank / seconds / 1e9, 1)}
            if copy_gbps:
                record["per_rank_pct_of_copy"] = round(100 * per_rank / seconds / 1e9 / copy_gbps, 1)
            if tp > 1 and device == "cuda":
                record.update(allreduce_share(llm, entries))
            emit(record)
            for e in entries:
                llm.engine.block_manager.free(e.block_table)
    finally:
        llm.close()
        del llm
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rdnac.bench.tp", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--layers", type=int, help="override the layer count (quick runs)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--batch", default="1,64", help="comma-separated decode batch sizes")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--num-blocks", type=int, default=2048, help="KV blocks per rank (sized for the batches)")
    parser.add_argument("--checkpoints", type=Path, help="reuse checkpoints written here (as rdnac bench)")
    parser.add_argument("--dry-run", action="store_true", help="cpu target over gloo: the flow without a GPU")
    args = parser.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    emit = Recorder(args.out)
    if not args.dry_run:
        emit({**environment(), "gpus": torch.cuda.device_count(),
              "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")})
    spec = dict(SHAPES[args.shape], **({"layers": args.layers} if args.layers else {}))
    work = Path(tempfile.mkdtemp(dir=os.environ.get("RDNAC_BENCH_TMP")))
    ckpt, write_s = random_checkpoint(args.checkpoints or work, args.shape, "bf16", spec)
    emit({"shape": args.shape, "layers": spec["layers"], "checkpoint_write_s": write_s and round(write_s, 1)})
    target = "cpu" if args.dry_run else "sm90"
    limits = ["--max-num-seqs", str(max(args.batch)), "--max-num-batched-tokens", "512", "--max-model-len",
              str(max(1024, args.context + 64))]
    plans = {}
    for tp in (args.tp, 1):
        plans[tp] = work / f"{args.shape}.tp{tp}.msgpack"
        seconds, _ = timed_subprocess(rdnac_cmd("compile", str(ckpt), "--target", target, "-o", str(plans[tp]),
                                                "-q", "--tp", str(tp), *limits),
                                      dict(os.environ, PYTHONPATH=str(ROOT)))
        emit({"tp": tp, "compile_s": round(seconds, 1)})
    copy_gbps = None if args.dry_run else copy_bandwidth()
    for tp in (args.tp, 1):  # the sharded plan first: its ranks are gone before the one-rank plan loads
        measure(plans[tp], tp, args, emit, copy_gbps)


if __name__ == "__main__":
    main()
