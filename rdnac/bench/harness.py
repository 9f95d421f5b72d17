"""The issue-6 harness (GPU): rdnac sm90 plans of random checkpoints of named shapes, end to end.

    rdnac bench --shape qwen3-8b --scheme bf16 --scheme fp8-block --peers --out results/

Per (shape, scheme), in one process and one run: device copy bandwidth; the
checkpoint written by `rdnac.testing.fp8`; compile time for sm90 (with
--cold-compile, a fresh XDG_CACHE_HOME and TRITON_CACHE_DIR, in a
subprocess); cold start (process start to the first token of `rdnac run`, in
a subprocess); decode TPOT with graphs at each batch size at context 256
(the middle of 128 prompt + 256 output tokens) with achieved bandwidth
(`decode`); prefill tokens/s and TFLOP/s (`prefill`); optionally a per-node
kernel breakdown and graph timelines (`profile`), A/B variants (no PDL, a
pass disabled, another tuning table) and transformers peers (`peers`).
`measure_plan` does the decode/prefill/profile part for an existing plan
(`rdnac bench PLAN --decode`). The MoE, hybrid and MLA shapes
(`rdnac.bench.families.FAMILIES`) go through `measure_family` instead. One
JSON line per measurement, printed and appended to OUT/results.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import rdnac
from rdnac.bench.decode import copy_bandwidth, decode_record
from rdnac.bench.families import FAMILIES, measure_family
from rdnac.bench.prefill import prefill_record
from rdnac.bench.profile import graph_timeline, kernel_breakdown
from rdnac.testing.fp8 import SHAPES, write_random_checkpoint

ROOT = Path(rdnac.__file__).resolve().parents[1]  # what the compile and run subprocesses import
SCHEMES = ("bf16", "fp8-block", "fp8-tensor")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to measure; `rdnac bench`'s timing options map one-to-one onto these fields."""

    out: Path = Path("bench-results")
    shapes: tuple[str, ...] = ("qwen3-8b",)
    schemes: tuple[str, ...] = ("bf16",)
    layers: int | None = None  # override the layer count (quick runs)
    batch: tuple[int, ...] = (1, 4, 16, 64)
    context: int = 256
    prefill: tuple[int, ...] = (512, 2048)
    peers: bool = False
    peer_compile_batch: tuple[int, ...] = (1, 16, 64)
    profile: bool = False
    timeline: tuple[int, ...] = ()
    ab_pdl: bool = False
    ab_disable_pass: tuple[str, ...] = ()
    ab_table: tuple[Path, ...] = ()
    cold_compile: bool = False
    checkpoints: Path | None = None
    tiny: bool = False  # family shapes only: their tiny variants on the cpu target (rdnac.bench.families)
    # which of "schemes", "batch", "context", "prefill" were chosen (the CLI's options given): a family shape
    # (rdnac.bench.families) takes its own for the others, a dense shape the defaults above
    given: tuple[str, ...] = ()

    def __post_init__(self):
        for shape in self.shapes:
            assert shape in FAMILIES or (shape in SHAPES and not self.tiny), shape  # the CLI offers only these
        for scheme in self.schemes:
            assert scheme in SCHEMES + ("mxfp4",), scheme
        assert min(self.batch + self.prefill + (self.context,), default=1) >= 1
        assert set(self.given) <= {"schemes", "batch", "context", "prefill"}, self.given


class Recorder:
    """Prints each measurement as one JSON line and appends it to OUT/results.jsonl."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.dir, self.path = out, out / "results.jsonl"

    def __call__(self, record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")

    def write_rows(self, name: str, rows: list[dict]) -> None:
        (self.dir / name).write_text(json.dumps(rows, indent=1))


def environment() -> dict:
    import transformers
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "argv": sys.argv[1:]}


def measure_plan(llm, cfg: BenchConfig, emit: Recorder, copy_gbps: float, *, name: str, label: dict,
                 profile: bool = False) -> None:
    """Decode at each batch size, prefill at each size, and the optional kernel breakdown and timelines of
    a loaded plan. `label`'s shape, scheme or plan open each record, its other keys (the A/B variant) close
    it; `name` names the profile and timeline files written beside results.jsonl."""
    head = {k: v for k, v in label.items() if k in ("shape", "scheme", "plan")}
    extra = {k: v for k, v in label.items() if k not in head}
    for batch in cfg.batch:
        emit({"engine": "rdnac", **head, **decode_record(llm, batch, cfg.context, copy_gbps), **extra})
    for tokens in cfg.prefill:
        emit({"engine": "rdnac", **head, **prefill_record(llm, tokens), **extra})
    if profile:
        rows, summary = kernel_breakdown(llm, cfg.context, copy_gbps)
        emit({**head, "profile_summary": summary})
        emit.write_rows(f"profile-{name}.json", rows)
        if cfg.prefill:
            tokens = max(cfg.prefill)
            rows, summary = kernel_breakdown(llm, cfg.context, copy_gbps, prefill=tokens)
            emit({**head, "prefill_profile_summary": summary, "prefill_tokens": tokens})
            emit.write_rows(f"profile-prefill{tokens}-{name}.json", rows)
    tag = "-".join(Path(str(v)).stem for k, v in extra.items() if k in ("disabled_pass", "table"))
    for batch in cfg.timeline:  # the graph-replay timeline of a decode step (see graph_timeline)
        rows, summary = graph_timeline(llm, cfg.context, batch)
        emit({**head, "timeline_summary": summary, **{k: extra[k] for k in extra if k != "launch_pdl"}})
        emit.write_rows(f"timeline-b{batch}-{name}{'-' + tag if tag else ''}.json", rows)


def random_checkpoint(root: Path, shape: str, scheme: str, spec: dict) -> tuple[Path, float | None]:
    """The random checkpoint of `shape`/`scheme` under `root`, and the seconds writing it took, or None
    where `root` already held one written from the same spec, seed and generator source (a stamp file
    beside it says which), e.g. by an earlier harness call on the same warm machine."""
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


def timed_subprocess(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def subprocess_env() -> dict:
    """The environment of the compile and run subprocesses: this tree's rdnac first, then whatever the
    caller's PYTHONPATH held (on the GPU machine, the unpacked wheels: xxhash, which writing a plan needs)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


def rdnac_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from rdnac.cli.main import main; main()", *args]


def run_harness(cfg: BenchConfig) -> None:
    """Every (shape, scheme) of `cfg`, in one process; results under cfg.out."""
    for table in cfg.ab_table:  # a broken table fails now, not after an hour of measuring
        check_table(table)
    emit = Recorder(cfg.out)
    emit(environment())
    work = Path(tempfile.mkdtemp(dir=os.environ.get("RDNAC_BENCH_TMP")))
    for shape in cfg.shapes:
        if shape in FAMILIES:
            measure_family(shape, work, cfg, emit)
            continue
        for scheme in cfg.schemes:
            measure_shape(shape, scheme, work, cfg, emit)


def measure_shape(shape: str, scheme: str, work: Path, cfg: BenchConfig, emit: Recorder) -> None:
    spec = dict(SHAPES[shape])
    if cfg.layers:
        spec["layers"] = cfg.layers
    ckpt, write_s = random_checkpoint(cfg.checkpoints or work, shape, scheme, spec)
    emit({"shape": shape, "scheme": scheme, "layers": spec["layers"], "checkpoint": str(ckpt),
          **({"checkpoint_reused": True} if write_s is None else {"checkpoint_write_s": round(write_s, 1)})})
    plan = work / f"{shape}-{scheme}.sm90.msgpack"
    env = subprocess_env()
    if cfg.cold_compile:
        cold = Path(tempfile.mkdtemp())
        env.update(XDG_CACHE_HOME=str(cold / "xdg"), TRITON_CACHE_DIR=str(cold / "triton"))
    compile_s, _ = timed_subprocess(rdnac_cmd("compile", str(ckpt), "--target", "sm90", "-o", str(plan), "-q"), env)
    emit({"shape": shape, "scheme": scheme, "compile_s": round(compile_s, 1), "cold_kernel_cache": cfg.cold_compile})
    cold_s, out = timed_subprocess(rdnac_cmd("run", str(plan), "--prompt", "Hello", "--max-tokens", "1",
                                             "--device", "cuda"), subprocess_env())
    emit({"shape": shape, "scheme": scheme, "cold_start_to_first_token_s": round(cold_s, 2),
          "startup_log": [line for line in out.splitlines() if line.startswith("rdnac:")]})

    label, name = {"shape": shape, "scheme": scheme}, f"{shape}-{scheme}"
    llm = rdnac.load(plan, device="cuda")
    bw = copy_bandwidth()
    measure_plan(llm, cfg, emit, bw, name=name, label={**label, "launch_pdl": True}, profile=cfg.profile)
    del llm
    torch.cuda.empty_cache()
    if cfg.ab_pdl:  # the same plan and binaries, launched without programmatic dependent launch
        llm = rdnac.load(plan, device="cuda", launch_pdl=False)
        measure_plan(llm, dataclasses.replace(cfg, timeline=()), emit, bw, name=name,
                     label={**label, "launch_pdl": False})
        del llm
        torch.cuda.empty_cache()
    if cfg.ab_disable_pass or cfg.ab_table:  # the disk holds the checkpoint and one 8B plan at a time
        for path in work.glob(f"{shape}-{scheme}.sm90.*"):
            path.unlink()
    for pass_name in cfg.ab_disable_pass:  # the same checkpoint compiled without one pass (warm kernel cache)
        measure_variant(ckpt, work / f"{name}.sm90.no-{pass_name}.msgpack", ["--disable-pass", pass_name],
                        subprocess_env(), {**label, "disabled_pass": pass_name}, cfg, emit, bw)
    for table in cfg.ab_table:  # the same checkpoint compiled with other measured entries winning
        with alternative_table(table, "sm90") as env:
            measure_variant(ckpt, work / f"{name}.sm90.table.msgpack", [], env, {**label, "table": str(table)},
                            cfg, emit, bw)
    if cfg.peers and scheme == "bf16":
        from rdnac.bench.peers import measure_transformers

        for record in measure_transformers(ckpt, list(cfg.batch), list(cfg.peer_compile_batch), list(cfg.prefill),
                                           cfg.context, bw):
            emit({**label, **record})
    if not cfg.checkpoints:  # 8B checkpoints and plans are 8-16 GB each; the disk holds 64 GB
        shutil.rmtree(ckpt)
    for path in work.glob(f"{shape}-{scheme}.sm90.*"):
        path.unlink()


def measure_variant(ckpt: Path, plan: Path, compile_args: list[str], env: dict, label: dict, cfg: BenchConfig,
                    emit: Recorder, bw: float) -> None:
    """Compile `ckpt` again to `plan` with `compile_args` in `env`, measure its decode and prefill records
    (each carrying `label`), then delete the plan: the disk holds the checkpoint and one 8B plan at a time."""
    compile_s, _ = timed_subprocess(rdnac_cmd("compile", str(ckpt), "--target", "sm90", "-o", str(plan), "-q",
                                              *compile_args), env)
    emit({**label, "compile_s": round(compile_s, 1)})
    llm = rdnac.load(plan, device="cuda")
    measure_plan(llm, cfg, emit, bw, name=f"{label['shape']}-{label['scheme']}", label=label)
    del llm
    torch.cuda.empty_cache()
    for path in plan.parent.glob(plan.name.removesuffix(".msgpack") + ".*"):
        path.unlink()


@contextlib.contextmanager
def alternative_table(table: Path, target: str):
    """An environment for `rdnac compile` in which `table`'s entries win over the shipped tuning table, as a
    user table does (`rdnac.compiler.tuning.table_paths`): XDG_CACHE_HOME points at a temporary cache whose
    rdnac/tuned/<target>.json is `table` and whose other entries link to the real rdnac cache (warm kernels)."""
    from rdnac.targets.probe import user_cache_dir

    check_table(table)
    real = user_cache_dir()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "rdnac"
        (root / "tuned").mkdir(parents=True)
        for entry in (real.iterdir() if real.is_dir() else []):
            if entry.name != "tuned":
                (root / entry.name).symlink_to(entry)
        shutil.copy(table, root / "tuned" / f"{target}.json")
        yield dict(subprocess_env(), XDG_CACHE_HOME=tmp)


def check_table(table: Path) -> None:
    """A broken --ab-table fails here, naming the file, not inside the compile."""
    from rdnac.errors import RdnacError

    if not table.is_file():
        raise RdnacError(f"--ab-table requires a tuning table file; got {table}, which is not a file")
    try:
        json.loads(table.read_text())
    except ValueError as e:
        raise RdnacError(f"--ab-table requires a JSON tuning table; {table} is not valid JSON ({e})") from e
