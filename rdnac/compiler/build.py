"""Build: AOT-compile the kernel specializations a plan needs, in parallel, cached.

Sits after kernel selection and before the plan is written. Input is the
list of `KernelCall`s that `RecordingLauncher` (rdnac.compiler.record)
collected from the program's wrappers; output is one `KernelBinary` per call
(rdnac.plans.binaries), compiled by the installed Triton for the target
(`rdnac.targets.compile`), on any machine (no GPU needed). Binaries are cached in
a content-addressed store, `<cache>/kernels/<key>` (msgpack), keyed by the
kernel's source hash, the specialization (with its alignment/divisibility
assumptions), the target and the Triton version. `check_resources` is how
config selection rejects a compiled candidate, with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable

import msgpack

from rdnac.errors import RdnacError
from rdnac.kernels.launch import resolve_kernel
from rdnac.plans.binaries import BINARY_FORMAT_VERSION, KernelBinary, KernelCall, sha256_hex
from rdnac.targets import Target, get_target
from rdnac.targets.compile import COMPILE_OPTIONS, compile_call
from rdnac.targets.probe import user_cache_dir


class BuildError(RdnacError):
    """A kernel specialization did not compile for the target; `kernels` names the kernels that did not."""

    def __init__(self, message: str, kernels: Iterable[str] = ()):
        super().__init__(message)
        self.kernels = sorted(set(kernels))


def cache_key(call: KernelCall, target: Target) -> str:
    """Content address of one binary: source, specialization, target, Triton version, build options."""
    import triton

    material = {"format": BINARY_FORMAT_VERSION, "kernel": call.kernel,
                "source": resolve_kernel(call.kernel).cache_key, "call": call.to_dict(),
                "target": [target.name, target.backend, target.arch, target.warp_size],
                "triton": triton.__version__, "options": COMPILE_OPTIONS}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def compile_calls(calls: Iterable[KernelCall], target: Target | str, *, quiet: bool = False,
                  max_workers: int | None = None, cache_dir: Path | None = None) -> list[KernelBinary]:
    """One `KernelBinary` per call (in order), read from the cache or compiled by worker processes
    (one per core, at most one per kernel; a single kernel compiles in this process)."""
    target = get_target(target)
    if not target.is_gpu:
        raise BuildError(f"building kernels requires a GPU target; got {target.name!r}; "
                         f"the cpu target runs the plan graph under the reference interpreter instead")
    calls = list(calls)
    store = (cache_dir or user_cache_dir()) / "kernels"
    keys = [cache_key(call, target) for call in calls]
    built: dict[str, KernelBinary] = {}
    todo: dict[str, KernelCall] = {}
    for key, call in zip(keys, calls):
        if key in built or key in todo:
            continue
        cached = _read_cached(store / key)
        if cached is not None:
            built[key] = cached
        else:
            todo[key] = call
    if todo:
        built.update(_compile_all(todo, target, quiet=quiet, max_workers=max_workers))
        for key in todo:
            _write_cached(store / key, built[key])
    return [built[key] for key in keys]


def check_resources(binary: KernelBinary, target: Target | str) -> list[str]:
    """Why `binary` must not be used on `target` (empty when it fits): LDS over budget, spills, threads."""
    target = get_target(target)
    res = binary.resources
    name = binary.key
    problems = []
    if binary.target != target.name:
        problems.append(f"{name}: built for {binary.target}, not {target.name}")
    if res.shared_bytes > target.lds_bytes:
        problems.append(f"{name}: needs {res.shared_bytes} bytes of LDS/shared memory; "
                        f"{target.name} allows {target.lds_bytes} per block")
    if res.num_spills > 0:
        problems.append(f"{name}: spills {res.num_spills} registers ({res.num_regs} in use)")
    threads = binary.call.num_warps * target.warp_size
    if threads > 1024:
        problems.append(f"{name}: {binary.call.num_warps} warps x {target.warp_size} = {threads} threads; "
                        f"the limit is 1024 per block")
    return problems


def _compile_all(todo: dict[str, KernelCall], target: Target, *, quiet: bool,
                 max_workers: int | None) -> dict[str, KernelBinary]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    workers = max(1, min(len(todo), max_workers or os.cpu_count() or 1))
    results: dict[str, KernelBinary] = {}
    failures: list[str] = []
    failed: list[str] = []
    progress = Progress(TextColumn("compiling kernels for {task.fields[target]}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
                        console=Console(stderr=True), disable=quiet)
    with progress:
        task = progress.add_task("", total=len(todo), target=target.name)
        if workers == 1:
            done = ((key, _compile_one(call.to_dict(), target.name)) for key, call in todo.items())
        else:
            done = _compile_in_workers(todo, target, workers)
        for key, out in done:
            if "error" in out:
                failures.append(f"{todo[key].key}: {out['error']}")
                failed.append(key)
            else:
                results[key] = KernelBinary.from_dict(out)
            progress.update(task, advance=1, description=todo[key].kernel.rpartition(":")[2])
    if failures:
        import triton

        # The Triton version is in the message: a kernel can build under one version and not another
        # (the GPU machine's Triton is older than CI's; tests/test_triton_gpu_machine.py builds under both).
        raise BuildError(f"building for {target.name} under Triton {triton.__version__} requires every kernel "
                         f"specialization to compile; {len(failures)} did not:\n  " + "\n  ".join(failures) +
                         "\ndo choose another config for these kernels, or report the Triton error",
                         kernels=[todo[key].kernel for key in failed])
    return results


def _compile_in_workers(todo: dict[str, KernelCall], target: Target, workers: int):
    """Yield (key, result) as `workers` subprocesses compile the calls.

    Workers are `python -m rdnac.compiler.build --worker` processes fed msgpack
    over stdin/stdout (as torch inductor's compile workers are), not a
    multiprocessing pool: spawn re-runs an unguarded caller script, and fork
    copies a parent that may hold a GPU context or LLVM threads."""
    jobs: queue.Queue = queue.Queue()
    for item in todo.items():
        jobs.put(item)
    done: queue.Queue = queue.Queue()
    threads = [threading.Thread(target=_drive_worker, args=(jobs, done, target.name), daemon=True)
               for _ in range(workers)]
    for thread in threads:
        thread.start()
    for _ in range(len(todo)):
        yield done.get()
    for thread in threads:
        thread.join()


def _drive_worker(jobs: queue.Queue, done: queue.Queue, target: str) -> None:
    """Feed one worker process until the queue is empty; a crashed worker fails its job and is replaced."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    proc = None
    with tempfile.TemporaryFile() as log:
        while True:
            try:
                key, call = jobs.get_nowait()
            except queue.Empty:
                break
            if proc is None:
                proc = subprocess.Popen([sys.executable, "-m", "rdnac.compiler.build", "--worker", target],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)
            try:
                _send(proc.stdin, call.to_dict())
                done.put((key, _receive(proc.stdout)))
            except (BrokenPipeError, EOFError):
                proc.wait()
                log.seek(0)
                tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
                done.put((key, {"error": f"compile worker died (exit {proc.returncode}): {' | '.join(tail)}"}))
                proc = None
        if proc is not None:
            proc.stdin.close()
            proc.wait()


def _compile_one(call: dict[str, Any], target: str) -> dict[str, Any]:
    """Compile one call; errors come back as text naming the cause (Triton's do not pickle)."""
    try:
        return compile_call(KernelCall.from_dict(call), target).to_dict()
    except Exception as e:  # noqa: BLE001 -- reported by the parent as a BuildError naming the kernel
        text = str(getattr(e, "error_message", None) or e.__cause__ or e)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return {"error": f"{type(e).__name__}{_failing_line(e)}: {lines[0] if lines else ''}"}


def _failing_line(e: Exception) -> str:
    """" at `<source line>`" for a Triton CompilationError: the kernel line its code generator stopped on
    (the error's own text, e.g. "'str' object has no attribute 'type'", rarely says where); else ""."""
    src, lineno = getattr(e, "src", None), getattr(getattr(e, "node", None), "lineno", None)
    lines = src.splitlines() if isinstance(src, str) else []
    return f" at `{lines[lineno - 1].strip()}`" if isinstance(lineno, int) and 0 < lineno <= len(lines) else ""


def _worker_main(target: str) -> None:
    """Compile calls read from stdin (msgpack) and write one reply each to stdout, until stdin closes."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything Triton prints goes to the log, not into the reply stream
    while True:
        try:
            call = _receive(sys.stdin.buffer)
        except EOFError:
            return
        _send(out, _compile_one(call, target))


# Messages between the parent and a worker: an 8-byte length, then that many bytes of msgpack.
def _send(stream, obj: Any) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _receive(stream) -> Any:
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError
    size = int.from_bytes(header, "little")
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return msgpack.unpackb(data, raw=False)


def _read_cached(path: Path) -> KernelBinary | None:
    if not path.exists():
        return None
    # An entry that does not decode, is of another format, or whose bytes do not match
    # their recorded hash is rebuilt, never used.
    try:
        binary = KernelBinary.from_dict(msgpack.unpackb(path.read_bytes(), raw=False))
    except (ValueError, KeyError, TypeError, msgpack.UnpackException, RdnacError):
        return None
    return binary if sha256_hex(binary.binary) == binary.sha256 else None


def _write_cached(path: Path, binary: KernelBinary) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(msgpack.packb(binary.to_dict(), use_bin_type=True))
    os.replace(tmp, path)  # atomic: a concurrent build never reads half an entry


if __name__ == "__main__":
    assert sys.argv[1] == "--worker", "usage: python -m rdnac.compiler.build --worker TARGET"
    _worker_main(sys.argv[2])
