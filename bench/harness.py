"""Issue 6 harness (GPU machine): rdnac sm90 plans against transformers on 8B-shaped random checkpoints.

    python bench/harness.py --out results/ --shapes qwen3-8b --schemes bf16 fp8-block --peers

Per (shape, scheme), in one process and one run: device copy bandwidth; the
checkpoint written by rdnac's generator; compile time for sm90 with a cold
kernel cache (a fresh XDG_CACHE_HOME and TRITON_CACHE_DIR, in a subprocess);
cold start (process start to the first token of `rdnac run`, in a
subprocess); decode TPOT with graphs at each batch size at context 256 (the
middle of 128 prompt + 256 output tokens) with achieved bandwidth = bytes
read per step (weights the step reads + KV cache) / TPOT; prefill tokens/s
and TFLOP/s; a per-node kernel breakdown of one batch-1 decode step
(torch.profiler); and with --peers the same decode and prefill through
transformers eager and transformers static cache + torch.compile. Writes one
JSON line per measurement to OUT/results.jsonl and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import rdnac  # noqa: E402
from rdnac.ir.state import bytes_per_token  # noqa: E402
from rdnac.runtime.model_runner import StepEntry  # noqa: E402
from rdnac.testing.fp8 import SHAPES, write_random_checkpoint  # noqa: E402
from decode import copy_bandwidth, tpot  # noqa: E402
from profile_step import graph_timeline, kernel_breakdown  # noqa: E402

CONTEXT = 256
RESULTS: Path | None = None


def emit(record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if RESULTS is not None:
        with RESULTS.open("a") as f:
            f.write(line + "\n")


def decode_bytes(engine, batch: int, context: int) -> int:
    """Bytes one decode step reads: every weight but the embedding table (only `batch` rows of it are
    read, unless the logits reuse it), plus the KV cache of `context` tokens per sequence."""
    graph = engine.graph
    logits_weights = {n.inputs[2] for n in graph.nodes if n.op == "logits"}
    embed = {n.inputs[1] for n in graph.nodes if n.op == "embedding"} - logits_weights
    total = sum(t.numel() * t.element_size() for k, t in engine.weights.items() if k not in embed)
    total += sum(batch * engine.weights[k].shape[1] * engine.weights[k].element_size() for k in embed)
    return total + batch * context * bytes_per_token(graph.state)  # the declared state a step reads


def matmul_flops(engine, tokens: int, context: int) -> float:
    """FLOPs of a prefill of `tokens` tokens: 2 per weight element per token for the linears and
    logits of the last token, plus causal attention (QK^T and PV)."""
    graph = engine.graph
    linear = sum(engine.weights[n.inputs[1]].numel() for n in graph.nodes
                 if n.op in ("linear", "linear_fp8", "linear_gated_act"))
    logits = sum(engine.weights[n.inputs[2]].numel() for n in graph.nodes if n.op == "logits")
    a = graph.attrs
    attn = 4 * a["num_layers"] * a["num_heads"] * a["head_dim"] * tokens * (context + 1) / 2
    return 2.0 * linear * tokens + 2.0 * logits + attn


def prefill_seconds(engine, tokens: int, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of a prefill step, and of its host part (until execute returns, every kernel
    enqueued): a host part close to the whole says the step is bound by launches, not kernels."""
    blocks = engine.engine.block_manager.take_blocks(-(-tokens // engine.runner.block_size))
    ids = [(7 * i) % 50000 + 300 for i in range(tokens)]
    times, host = [], []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.runner.execute([StepEntry(ids, blocks, 0, tokens)])
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    engine.engine.block_manager.free(blocks)
    median = lambda xs: sorted(xs[1:])[len(xs[1:]) // 2]  # noqa: E731  (the first is a warm-up)
    return median(times), median(host)


def timed_subprocess(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def rdnac_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from rdnac.cli.main import main; main()", *args]


def decode_records(engine, shape: str, scheme: str, batches: list[int], bw: float, **extra) -> None:
    for batch in batches:
        t = tpot(engine, batch, CONTEXT)
        read = decode_bytes(engine, batch, CONTEXT)
        emit({"engine": "rdnac", "shape": shape, "scheme": scheme, "batch": batch, "context": CONTEXT,
              "tpot_ms": round(t * 1e3, 3), "tokens_per_s": round(batch / t, 1), "bytes_read_GB": round(read / 1e9, 3),
              "achieved_GBps": round(read / t / 1e9, 1), "pct_of_copy": round(100 * read / t / 1e9 / bw, 1),
              "copy_GBps": round(bw, 1), "plan_pdl": engine.plan.body["runtime"].get("pdl", False), **extra})


class GpuClocks:
    """SM clock (MHz) and board power (W) sampled by nvidia-smi every 50 ms while the block runs: a
    sustained prefill may run below the clock the kernels were tuned at (short bursts)."""

    def __enter__(self):
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                          "-lms", "50"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        self.samples = []
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate()
            for line in out.splitlines():
                try:
                    clock, power = (float(f) for f in line.split(","))
                except ValueError:  # the last line may be cut off by terminate()
                    continue
                self.samples.append((clock, power))

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_clocks": "not sampled (nvidia-smi not found or no sample in the window)"}
        clocks = sorted(c for c, _ in self.samples)
        return {"sm_mhz_min": clocks[0], "sm_mhz_median": clocks[len(clocks) // 2],
                "power_w_max": max(p for _, p in self.samples), "clock_samples": len(clocks)}


def prefill_records(engine, shape: str, scheme: str, sizes: list[int], **extra) -> None:
    for tokens in sizes:
        with GpuClocks() as clocks:
            t, host = prefill_seconds(engine, tokens)
        emit({"engine": "rdnac", "shape": shape, "scheme": scheme, "prefill_tokens": tokens,
              "prefill_ms": round(t * 1e3, 2), "host_enqueue_ms": round(host * 1e3, 2),
              "tokens_per_s": round(tokens / t), "tflops":
              round(matmul_flops(engine, tokens, tokens) / t / 1e12, 1), **clocks.summary(), **extra})


def random_checkpoint(root: Path, shape: str, scheme: str, spec: dict) -> tuple[Path, float | None]:
    """The random checkpoint of `shape`/`scheme` under `root`, and the seconds writing it took, or None
    where `root` already held one written from the same spec, seed and generator source (a stamp file
    beside it says which), e.g. by an earlier harness call on the same warm machine."""
    import hashlib
    import inspect

    from rdnac.compiler.passes import quantize
    from rdnac.ir import fp8
    from rdnac.testing import fp8 as generator

    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / f"{shape}-{scheme}"
    stamp_path = root / f"{shape}-{scheme}.stamp.json"
    source = "".join(inspect.getsource(module) for module in (generator, quantize, fp8))  # what writes the bytes
    stamp = {"spec": spec, "scheme": scheme, "seed": 0, "generator_sha256": hashlib.sha256(source.encode()).hexdigest()}
    if ckpt.is_dir() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return ckpt, None
    stamp_path.unlink(missing_ok=True)  # a write cut short leaves no stamp behind
    shutil.rmtree(ckpt, ignore_errors=True)
    started = time.perf_counter()
    write_random_checkpoint(ckpt, scheme=None if scheme == "bf16" else scheme, seed=0, **spec)
    stamp_path.write_text(json.dumps(stamp))
    return ckpt, time.perf_counter() - started


def measure_rdnac(shape: str, scheme: str, work: Path, args) -> None:
    spec = dict(SHAPES[shape])
    if args.layers:
        spec["layers"] = args.layers
    ckpt, write_s = random_checkpoint(args.checkpoints or work, shape, scheme, spec)
    emit({"shape": shape, "scheme": scheme, "layers": spec["layers"], "checkpoint": str(ckpt),
          **({"checkpoint_reused": True} if write_s is None else {"checkpoint_write_s": round(write_s, 1)})})
    plan = work / f"{shape}-{scheme}.sm90.msgpack"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if args.cold_compile:
        cold = Path(tempfile.mkdtemp())
        env.update(XDG_CACHE_HOME=str(cold / "xdg"), TRITON_CACHE_DIR=str(cold / "triton"))
    compile_s, _ = timed_subprocess(rdnac_cmd("compile", str(ckpt), "--target", "sm90", "-o", str(plan), "-q"), env)
    emit({"shape": shape, "scheme": scheme, "compile_s": round(compile_s, 1), "cold_kernel_cache": args.cold_compile})
    cold_s, out = timed_subprocess(rdnac_cmd("run", str(plan), "--prompt", "Hello", "--max-tokens", "1",
                                             "--device", "cuda"), dict(os.environ, PYTHONPATH=str(ROOT)))
    emit({"shape": shape, "scheme": scheme, "cold_start_to_first_token_s": round(cold_s, 2),
          "startup_log": [line for line in out.splitlines() if line.startswith("rdnac:")]})

    engine = rdnac.load(plan, device="cuda")
    bw = copy_bandwidth()
    decode_records(engine, shape, scheme, args.batch, bw, launch_pdl=True)
    prefill_records(engine, shape, scheme, args.prefill, launch_pdl=True)
    if args.profile:
        rows, summary = kernel_breakdown(engine, CONTEXT, bw)
        emit({"shape": shape, "scheme": scheme, "profile_summary": summary})
        (RESULTS.parent / f"profile-{shape}-{scheme}.json").write_text(json.dumps(rows, indent=1))
        tokens = max(args.prefill)
        rows, summary = kernel_breakdown(engine, CONTEXT, bw, prefill=tokens)
        emit({"shape": shape, "scheme": scheme, "prefill_profile_summary": summary, "prefill_tokens": tokens})
        (RESULTS.parent / f"profile-prefill{tokens}-{shape}-{scheme}.json").write_text(json.dumps(rows, indent=1))
    if args.timeline:
        timelines(engine, shape, scheme, args)
    del engine
    torch.cuda.empty_cache()
    if args.ab_pdl:  # the same plan and binaries, launched without programmatic dependent launch
        engine = rdnac.load(plan, device="cuda", launch_pdl=False)
        decode_records(engine, shape, scheme, args.batch, bw, launch_pdl=False)
        prefill_records(engine, shape, scheme, args.prefill, launch_pdl=False)
        del engine
        torch.cuda.empty_cache()
    if args.ab_disable_pass or args.ab_table:  # the disk holds the checkpoint and one 8B plan at a time
        for path in work.glob(f"{shape}-{scheme}.sm90.*"):
            path.unlink()
    for name in args.ab_disable_pass:  # the same checkpoint compiled without one pass (warm kernel cache)
        measure_variant(ckpt, work / f"{shape}-{scheme}.sm90.no-{name}.msgpack", ["--disable-pass", name],
                        dict(os.environ, PYTHONPATH=str(ROOT)), {"disabled_pass": name}, shape, scheme, args, bw)
    for table in args.ab_table:  # the same checkpoint compiled with other measured entries winning
        with alternative_table(table, "sm90") as env:
            measure_variant(ckpt, work / f"{shape}-{scheme}.sm90.table.msgpack", [], env, {"table": str(table)},
                            shape, scheme, args, bw)
    if args.peers and scheme == "bf16":
        from peers import measure_transformers

        for record in measure_transformers(ckpt, args.batch, args.peer_compile_batch, args.prefill, CONTEXT, bw):
            emit({"shape": shape, "scheme": scheme, **record})
    if not args.checkpoints:  # 8B checkpoints and plans are 8-16 GB each; the disk holds 64 GB
        shutil.rmtree(ckpt)
    for path in work.glob(f"{shape}-{scheme}.sm90.*"):
        path.unlink()


def timelines(engine, shape: str, scheme: str, args, **label) -> None:
    """The graph-replay timeline of a decode step at each --timeline batch size (see graph_timeline)."""
    tag = "-".join(Path(str(v)).stem for v in label.values())  # e.g. the disabled pass, the table's name
    for batch in args.timeline:
        rows, summary = graph_timeline(engine, CONTEXT, batch)
        emit({"shape": shape, "scheme": scheme, "timeline_summary": summary, **label})
        name = f"timeline-b{batch}-{shape}-{scheme}{'-' + tag if tag else ''}.json"
        (RESULTS.parent / name).write_text(json.dumps(rows, indent=1))


def measure_variant(ckpt: Path, plan: Path, compile_args: list[str], env: dict, label: dict, shape: str,
                    scheme: str, args, bw: float) -> None:
    """Compile `ckpt` again to `plan` with `compile_args` in `env`, measure its decode and prefill records
    (each carrying `label`), then delete the plan: the disk holds the checkpoint and one 8B plan at a time."""
    compile_s, _ = timed_subprocess(rdnac_cmd("compile", str(ckpt), "--target", "sm90", "-o", str(plan), "-q",
                                              *compile_args), env)
    emit({"shape": shape, "scheme": scheme, **label, "compile_s": round(compile_s, 1)})
    engine = rdnac.load(plan, device="cuda")
    decode_records(engine, shape, scheme, args.batch, bw, **label)
    prefill_records(engine, shape, scheme, args.prefill, **label)
    if args.timeline:
        timelines(engine, shape, scheme, args, **label)
    del engine
    torch.cuda.empty_cache()
    for path in plan.parent.glob(plan.name.removesuffix(".msgpack") + ".*"):
        path.unlink()


@contextlib.contextmanager
def alternative_table(table: Path, target: str):
    """An environment for `rdnac compile` in which `table`'s entries win over the shipped tuning table, as a
    user table does (`rdnac.compiler.tuning.table_paths`): XDG_CACHE_HOME points at a temporary cache whose
    rdnac/tuned/<target>.json is `table` and whose other entries link to the real rdnac cache (warm kernels)."""
    from rdnac.targets.probe import user_cache_dir

    if not table.is_file():
        raise SystemExit(f"--ab-table: {table} is not a file")
    try:  # a broken table fails here, naming the file, not inside the compile
        json.loads(table.read_text())
    except ValueError as e:
        raise SystemExit(f"--ab-table: {table} is not valid JSON ({e})") from e
    real = user_cache_dir()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "rdnac"
        (root / "tuned").mkdir(parents=True)
        for entry in (real.iterdir() if real.is_dir() else []):
            if entry.name != "tuned":
                (root / entry.name).symlink_to(entry)
        shutil.copy(table, root / "tuned" / f"{target}.json")
        yield dict(os.environ, PYTHONPATH=str(ROOT), XDG_CACHE_HOME=tmp)


def main() -> None:
    global RESULTS
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--shapes", nargs="+", default=["qwen3-8b"], choices=sorted(SHAPES))
    ap.add_argument("--schemes", nargs="+", default=["bf16"], choices=["bf16", "fp8-block", "fp8-tensor"])
    ap.add_argument("--layers", type=int, help="Override the layer count (quick runs).")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--peers", action="store_true", help="Also transformers eager and static cache + compile.")
    ap.add_argument("--peer-compile-batch", type=int, nargs="+", default=[1, 16, 64],
                    help="Batch sizes for transformers + torch.compile (each one recompiles).")
    ap.add_argument("--profile", action="store_true", help="Per-node kernel breakdown of a batch-1 decode step.")
    ap.add_argument("--timeline", type=int, nargs="+", default=[], metavar="BATCH",
                    help="Per-kernel timeline of a captured decode graph's replay at these batch sizes, for the "
                         "plan and each A/B variant: duration, early start under PDL and how far each kernel "
                         "moves the step's end.")
    ap.add_argument("--ab-pdl", action="store_true",
                    help="Also decode with the plan's PDL binaries launched without programmatic dependent launch.")
    ap.add_argument("--ab-disable-pass", nargs="+", default=[], metavar="PASS",
                    help="Also compile, decode and prefill with each of these compiler passes turned off.")
    ap.add_argument("--ab-table", nargs="+", default=[], type=Path, metavar="TABLE",
                    help="Also compile and measure with each TABLE (tuning entries, e.g. from tune_kernels.py "
                         "--out) winning over the shipped sm90 table, as a user table does.")
    ap.add_argument("--cold-compile", action="store_true", help="Compile with empty rdnac and Triton caches.")
    ap.add_argument("--checkpoints", type=Path, metavar="DIR",
                    help="Keep the random checkpoints in DIR and reuse those written from the same spec, seed "
                         "and generator (a later call on the same warm machine skips the 60-90 s write).")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    RESULTS = args.out / "results.jsonl"
    import triton
    import transformers

    emit({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
          "transformers": transformers.__version__, "argv": sys.argv[1:]})
    work = Path(tempfile.mkdtemp(dir=os.environ.get("RDNAC_BENCH_TMP")))
    for shape in args.shapes:
        for scheme in args.schemes:
            measure_rdnac(shape, scheme, work, args)


if __name__ == "__main__":
    main()
