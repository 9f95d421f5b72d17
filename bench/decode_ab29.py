"""Issue 29's batch-1 decode figures in one GPU call (at most 600 s on an H100): the new passes on and off,
bf16, the FP8 KV cache against bf16 KV, and SmolLM2.

    PYTHONPATH=$PWD python bench/decode_ab29.py --out $OUT/ab29          # on the GPU machine
    PYTHONPATH=$PWD python bench/decode_ab29.py --tiny --out /tmp/ab29   # cpu dry run (Triton interpreter)

Phases, each a random checkpoint of `rdnac.testing.fp8.SHAPES` compiled for sm90 (several compiles at a
time, in subprocesses; each plan is loaded as its compile ends and its files deleted, so the disk holds the
checkpoint and at most --jobs plans):
  fp8    Qwen3-8B-shaped FP8 block: the default plan and the same checkpoint with --disable-pass
         early_weight_loads, fuse_act_linear, and both, timed at batch 1, context 256, alternating between
         the plans round by round (clock drift falls on all); then the default plan (bf16 KV) against
         --kv-cache-dtype fp8 at context 8192, alternating likewise.
  small  SmolLM2-135M-shaped bf16, batch 1, context 256.
  bf16   Qwen3-8B-shaped bf16, batch 1, context 256.
  llama-fp8, llama-bf16  Llama-3.1-8B-shaped FP8 block and bf16, batch 1, context 256 (not in the default
         run, which fills a call: `--phases llama-fp8 llama-bf16` is a call of its own).
Each record is the median of its rounds: TPOT and achieved bandwidth against the device's copy bandwidth
(`rdnac.bench.decode`), as `rdnac bench` computes them. Plans are compiled with --max-num-seqs 1 (batch-1
decode runs the same kernels and configs; fewer specializations to build). A phase that would not finish
inside --budget-s (from the estimate printed at the start) is skipped, with a record saying so.

Writes OUT/results.jsonl (the lines it prints) and OUT/table.md (the same figures, and each disabled
pass's cost in ms and in points of copy against the default plan).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rdnac  # noqa: E402
from rdnac.bench.decode import copy_bandwidth, decode_bytes, tpot  # noqa: E402
from rdnac.bench.harness import ROOT, Recorder, environment, random_checkpoint, rdnac_cmd  # noqa: E402
from rdnac.testing.fp8 import SHAPES  # noqa: E402

NEW_PASSES = ("early_weight_loads", "fuse_act_linear")


@dataclass
class Phase:
    name: str
    shape: str
    scheme: str  # "bf16" or "fp8-block"
    plans: dict[str, list[str]]  # plan name -> extra `rdnac compile` arguments
    runs: list[tuple[str, tuple[str, ...], int]]  # (measurement, plans alternated, context) at batch 1
    est_s: float = 0.0  # the time it is expected to take on an H100 machine (see `estimate`)
    layers: int | None = None  # override (the tiny dry run)
    llms: dict = field(default_factory=dict)


def phases(tiny: bool) -> list[Phase]:
    ctx, long_ctx = (16, 48) if tiny else (256, 8192)
    ab = {"all": [], **{f"no-{p}": ["--disable-pass", p] for p in NEW_PASSES},
          "no-both": [a for p in NEW_PASSES for a in ("--disable-pass", p)], "kv-fp8": ["--kv-cache-dtype", "fp8"]}
    big, small, llama = ("tiny", "tiny", "tiny") if tiny else ("qwen3-8b", "smollm2", "llama3-8b")
    return [Phase("fp8", big, "fp8-block", ab, [("passes", ("all", "no-early_weight_loads", "no-fuse_act_linear",
                                                             "no-both"), ctx),
                                                  ("kv_cache", ("all", "kv-fp8"), long_ctx)]),
            Phase("small", small, "bf16", {"bf16": []}, [("batch1", ("bf16",), ctx)], layers=1 if tiny else None),
            Phase("bf16", big, "bf16", {"bf16": []}, [("batch1", ("bf16",), ctx)]),
            # the acceptance's Llama-3.1-8B-shaped rows beside Qwen3-8B's (a call of their own: --phases llama-*)
            Phase("llama-fp8", llama, "fp8-block", {"all": []}, [("batch1", ("all",), ctx)]),
            Phase("llama-bf16", llama, "bf16", {"bf16": []}, [("batch1", ("bf16",), ctx)])]


def estimate(phase: Phase, jobs: int) -> float:
    """Seconds on the H100 machine, from its earlier runs (bench/results: an 8B checkpoint written in 63-114 s
    whatever its scheme, an 8B compile 30-56 s), scaled by parameter count: writing ~75 s, each compile
    ~45 s (bf16 ~55 s) + 10 s of start-up, `jobs` at a time taking ~0.6 of their sum (shared disk and cores),
    loading ~4 s per 8 GB and the timed rounds ~3 s per plan."""
    spec = SHAPES[phase.shape]
    params = spec["layers"] * (4 * spec["hidden"] ** 2 + 3 * spec["hidden"] * spec["intermediate"]) \
        + 2 * spec["vocab"] * spec["hidden"]
    scale, bf16 = params / 9.1e9, phase.scheme == "bf16"  # relative to Qwen3-8B
    n = len(phase.plans)
    compiles = (45 * scale * (1.2 if bf16 else 1) + 10) * n * (0.6 if n > 1 and jobs > 1 else 1)
    return 75 * scale + 2 + compiles + (4 * scale * (2 if bf16 else 1) + 3) * n


def compile_and_load(phase: Phase, ckpt: Path, work: Path, args, emit: Recorder, blocks: int) -> None:
    """Compile the phase's plans, `args.jobs` at a time; load each as its compile ends and delete its files."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    pending, running = list(phase.plans.items()), {}
    try:
        _compile_loop(phase, ckpt, work, args, emit, blocks, env, pending, running)
    finally:  # a failed compile or load stops the others (this script's own subprocesses)
        for proc, _, _ in running.values():
            proc.kill()
            proc.wait()


def _compile_loop(phase, ckpt, work, args, emit, blocks, env, pending, running) -> None:
    while pending or running:
        while pending and len(running) < args.jobs:
            name, extra = pending.pop(0)
            plan = work / f"{phase.name}-{name}.sm90.msgpack"
            cmd = rdnac_cmd("compile", str(ckpt), "--target", "sm90", "-o", str(plan), "-q", "--max-num-seqs", "1",
                            *extra)
            with plan.with_suffix(".log").open("w") as log:  # a file, not a pipe: a full pipe would stall it
                running[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), plan,
                                 time.perf_counter())
        done = [n for n, (proc, _, _) in running.items() if proc.poll() is not None]
        if not done:
            time.sleep(0.5)
            continue
        for name in done:
            proc, plan, started = running.pop(name)
            if proc.returncode:
                log = plan.with_suffix(".log").read_text()
                raise RuntimeError(f"compile {phase.name}/{name} failed ({proc.returncode}):\n{log[-3000:]}")
            emit({"bench": "decode_ab29", "phase": phase.name, "plan": name, "compile_args": phase.plans[name],
                  "compile_s": round(time.perf_counter() - started, 1), "parallel_jobs": args.jobs})
            phase.llms[name] = rdnac.load(plan, device=args.device, interpret=args.device == "cpu",
                                          verify_weights=False, max_num_seqs=1, num_blocks=blocks)
            for path in plan.parent.glob(plan.name.removesuffix(".msgpack") + ".*"):
                path.unlink()


def measure(phase: Phase, args, emit: Recorder, copy_gbps: float, rows: list[dict]) -> None:
    for what, names, context in phase.runs:
        times = {n: [] for n in names}
        for _ in range(args.rounds):
            for n in names:
                times[n].append(tpot(phase.llms[n], 1, context, steps=args.steps, warmup=args.warmup))
        for n in names:
            llm, t = phase.llms[n], statistics.median(times[n])
            read = decode_bytes(llm, 1, context)
            rt = llm.plan.body["runtime"]
            row = {"bench": "decode_ab29", "phase": phase.name, "measure": what, "shape": phase.shape,
                   "scheme": phase.scheme, "plan": n, "disabled_passes": [a for a in phase.plans[n]
                                                                          if a in NEW_PASSES],
                   "kv_cache": sorted({s.dtype for s in llm.graph.state}), "batch": 1, "context": context,
                   "tpot_ms": round(t * 1e3, 4), "rounds_ms": [round(x * 1e3, 4) for x in times[n]],
                   "bytes_read_GB": round(read / 1e9, 4), "achieved_GBps": round(read / t / 1e9, 1),
                   "pct_of_copy": round(100 * read / t / 1e9 / copy_gbps, 1), "copy_GBps": round(copy_gbps, 1),
                   "plan_pdl": rt.get("pdl", False), "early_weights": rt.get("early_weights", False),
                   "fused_down_projections": llm.graph.op_counts().get("gated_act_linear_fp8", 0)}
            emit(row)
            rows.append(row)


def table(rows: list[dict]) -> str:
    lines = ["| phase | measure | plan | context | TPOT ms | % of copy | vs default |", "|---|---|---|---|---|---|---|"]
    base = {(r["phase"], r["measure"]): r for r in rows if r["plan"] == "all"}
    for r in rows:
        b = base.get((r["phase"], r["measure"]))
        vs = "" if b is None or b is r else \
            f"{r['tpot_ms'] - b['tpot_ms']:+.3f} ms, {r['pct_of_copy'] - b['pct_of_copy']:+.1f} pts"
        lines.append(f"| {r['phase']} | {r['measure']} | {r['plan']} | {r['context']} | {r['tpot_ms']:.3f} | "
                     f"{r['pct_of_copy']:.1f} | {vs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results.jsonl and table.md go here")
    p.add_argument("--work", type=Path, default=None,
                   help="where the temporary directory of checkpoints and plans goes (default: the system's; "
                        "not under OUT: 8-16 GB each)")
    p.add_argument("--tiny", action="store_true", help="cpu dry run: tiny shapes under the Triton interpreter")
    p.add_argument("--phases", nargs="+", default=["fp8", "small", "bf16"],
                   choices=["fp8", "small", "bf16", "llama-fp8", "llama-bf16"])
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds per measurement (default 3)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per round (default 100)")
    p.add_argument("--jobs", type=int, default=3, help="compiles at a time")
    p.add_argument("--budget-s", type=float, default=570, help="skip a phase the estimate says would not fit")
    args = p.parse_args(argv)
    args.device = "cpu" if args.tiny else "cuda"
    args.rounds = args.rounds or (1 if args.tiny else 3)
    args.steps = args.steps or (1 if args.tiny else 100)
    args.warmup = 1 if args.tiny else 5

    started = time.perf_counter()
    emit = Recorder(args.out)
    emit({**(environment() if args.device == "cuda" else {"device": "cpu (dry run)", "argv": sys.argv[1:]}),
          "bench": "decode_ab29"})
    todo = [ph for ph in phases(args.tiny) if ph.name in args.phases]
    for ph in todo:
        ph.est_s = estimate(ph, args.jobs)
    print(f"# estimate: {' + '.join(f'{ph.name} ~{ph.est_s:.0f} s' for ph in todo)} = "
          f"~{sum(ph.est_s for ph in todo):.0f} s (budget {args.budget_s:.0f} s)", file=sys.stderr, flush=True)
    copy_gbps = copy_bandwidth(args.device, (1 << 24) if args.tiny else (1 << 30))
    work = Path(tempfile.mkdtemp(prefix="decode_ab29_", dir=args.work))
    rows: list[dict] = []
    failed = []
    for ph in todo:
        elapsed = time.perf_counter() - started
        if elapsed + ph.est_s > args.budget_s:
            emit({"bench": "decode_ab29", "phase": ph.name, "skipped": f"estimated {ph.est_s:.0f} s after "
                  f"{elapsed:.0f} s would pass the {args.budget_s:.0f} s budget"})
            continue
        t0 = time.perf_counter()
        print(f"# phase {ph.name} from {elapsed:.0f} s (estimated {ph.est_s:.0f} s)", file=sys.stderr, flush=True)
        try:
            run_phase(ph, work, args, emit, copy_gbps, rows)
        except Exception:  # noqa: BLE001 -- recorded, and the exit status says so; the next phase still runs
            failed.append(ph.name)
            emit({"bench": "decode_ab29", "phase": ph.name, "error": traceback.format_exc(limit=-6)})
        ph.llms.clear()
        shutil.rmtree(work, ignore_errors=True)  # what a failed phase left (checkpoints and plans are 8-16 GB)
        work.mkdir()
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        emit({"bench": "decode_ab29", "phase": ph.name, "phase_s": round(time.perf_counter() - t0, 1),
              "estimated_s": round(ph.est_s)})
        (args.out / "table.md").write_text(table(rows))
    shutil.rmtree(work, ignore_errors=True)
    print(table(rows), file=sys.stderr)
    print(f"# total {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if failed:
        sys.exit(f"phases failed: {', '.join(failed)} (see the error records)")


def run_phase(ph: Phase, work: Path, args, emit: Recorder, copy_gbps: float, rows: list[dict]) -> None:
    spec = dict(SHAPES[ph.shape], **({"layers": ph.layers} if ph.layers else {}))
    ckpt, write_s = random_checkpoint(work, ph.shape, ph.scheme, spec)
    emit({"bench": "decode_ab29", "phase": ph.name, "shape": ph.shape, "scheme": ph.scheme,
          "layers": spec["layers"], "checkpoint_write_s": None if write_s is None else round(write_s, 1)})
    longest = max(c for _, _, c in ph.runs)
    compile_and_load(ph, ckpt, work, args, emit, blocks=-(-(longest + 1) // 16) + 8)
    shutil.rmtree(ckpt)
    measure(ph, args, emit, copy_gbps, rows)


if __name__ == "__main__":
    main()
