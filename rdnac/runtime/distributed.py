"""Tensor-parallel plans at run time: one process per rank over torch.distributed (gloo on cpu).

A plan compiled with `--tp N` (`rdnac.compiler.passes.shard`) is one graph
every rank runs with its own weights file (a cpu plan under the interpreter
over gloo; a GPU plan on one GPU per rank over NCCL, RCCL on ROCm, with the
collectives inside its captured decode graphs; a GPU plan under
`--interpret` on the CPU over gloo, for checking it without GPUs); the graph's collectives
(`rdnac.ir.collectives`) meet across the ranks. Rank 0 owns the one
`LLMEngine` (scheduler, block manager, sampler, detokenizer) over a
`TPRunner`: before each model call (allocate the state, execute a step) it
broadcasts the call to the other ranks, whose `serve_rank` loop runs the same
call on their weights. Logits are all-gathered, so rank 0 samples alone.

`start(plan)` (what `rdnac.load`, `rdnac run` and `rdnac serve` call for a
sharded plan) either joins a group torchrun set up (`WORLD_SIZE`, `RANK`,
`MASTER_ADDR`/`MASTER_PORT` in the environment; ranks other than 0 serve and
then exit the process) or starts ranks 1..N-1 itself, the caller being rank
0: fresh interpreters (`python -m rdnac.runtime.distributed`), as
torch.multiprocessing's spawn would, but without re-importing the caller's
`__main__`, so a script without a main guard, `python -c` or a notebook can
load a sharded plan too. Collectives time out after
`RDNAC_TP_TIMEOUT` seconds (default 300); a rank that dies or leaves makes the
others fail at their next collective with one line naming it, instead of
hanging. Commands wait on a second group without that limit, so an idle
server's ranks do not time out.
"""

from __future__ import annotations

import argparse
import atexit
import os
import socket
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from rdnac.errors import EngineError, PlanError, RdnacError
from rdnac.runtime.model_runner import ModelRunner, StepEntry, StepOutput
from rdnac.runtime.sampling import SamplingBatch

_IDLE = timedelta(days=365)  # how long a rank waits for the next command (an idle server)


def _timeout() -> timedelta:
    raw = os.environ.get("RDNAC_TP_TIMEOUT", "300")
    try:
        return timedelta(seconds=float(raw))
    except ValueError:
        raise RdnacError(f"RDNAC_TP_TIMEOUT requires a number of seconds; got {raw!r}") from None


class TPRunner(ModelRunner):
    """Rank 0's runner of a sharded plan: every model call is broadcast to the other ranks first."""

    group = None  # the collectives' group (set by `start`)
    commands = None  # the group commands travel on
    processes: list = []  # the ranks this process spawned (empty under torchrun)
    _inside = False  # inside a broadcast call: the model calls it makes itself are not broadcast again

    def _send(self, command: tuple) -> None:
        if self._inside:
            return
        try:
            dist.broadcast_object_list([command], src=0, group=self.commands)
        except RuntimeError as e:
            raise self._group_down(e) from None

    def _group_down(self, e: Exception) -> EngineError:
        dead = [f"rank {r} (exit code {p.poll()})" for r, p in enumerate(self.processes, 1)
                if p.poll() is not None]
        who = ", ".join(dead) if dead else "a rank"
        return EngineError(f"tensor-parallel group of {self.plan.num_ranks} ranks is down: {who} stopped "
                          f"({_reason(e)}); restart rdnac")

    def _relayed(self, command: tuple, call):
        """Broadcast `command`, then run `call` here, whose own model calls every rank makes already."""
        self._send(command)
        outer, self._inside = self._inside, True
        try:
            return call()
        except torch.OutOfMemoryError:  # the device's own error, not the group's
            raise
        except RuntimeError as e:  # a collective failed: a rank died, or timed out
            raise self._group_down(e) from None
        finally:
            self._inside = outer

    def allocate_state(self, num_blocks: int, num_slots: int, max_num_seqs: int | None = None):
        return self._relayed(("allocate", num_blocks, num_slots, max_num_seqs),
                             lambda: super(TPRunner, self).allocate_state(num_blocks, num_slots, max_num_seqs))

    def profile_step_bytes(self, num_tokens: int) -> int:
        """Rank 0's peak step bytes; every rank runs the step (its collectives need them all)."""
        return self._relayed(("profile", num_tokens), lambda: super(TPRunner, self).profile_step_bytes(num_tokens))

    def capture_graphs(self, max_num_seqs: int | None = None) -> float:
        """Every rank captures the same buckets in the same order (the collectives inside meet)."""
        return self._relayed(("capture", max_num_seqs), lambda: super(TPRunner, self).capture_graphs(max_num_seqs))

    def execute(self, entries: list[StepEntry], sampling: SamplingBatch | None = None,
                logits_all: bool = False) -> StepOutput:
        self._send(("execute", wire_entries(entries), logits_all))
        try:
            return super().execute(entries, sampling, logits_all)
        except torch.OutOfMemoryError:  # the device's own error, not the group's
            raise
        except RuntimeError as e:  # a collective failed: a rank died, or timed out
            raise self._group_down(e) from None

    def close(self) -> None:
        """Stop the other ranks and leave the group (at exit, or when the LLM is done)."""
        if self.commands is None:
            return
        try:
            self._send(("stop",))
        except RdnacError:
            pass  # the group is down already: its ranks have stopped on their own
        _reap(self.processes)
        dist.destroy_process_group()
        self.commands = self.group = None
        self.graphs = self.cache = None  # the device memory goes with the last reference to the LLM
        atexit.unregister(self.close)


class _Window(list):
    """Tokens [start, end) of a sequence, indexed by the sequence's own positions (`start` set after
    construction): what a step's command carries of each entry's tokens, the only ones a model step reads
    (ModelRunner.execute slices token_ids[start:end])."""

    start = 0

    def __getitem__(self, index):
        if isinstance(index, slice):
            return list.__getitem__(self, slice(index.start - self.start, index.stop - self.start))
        return list.__getitem__(self, index - self.start)


def wire_entries(entries: list[StepEntry]) -> list[StepEntry]:
    """The entries as the other ranks receive them: each with only its step's tokens, so a command stays the
    size of the step's new tokens and block tables however long the sequences are."""
    out = []
    for e in entries:
        window = _Window(e.token_ids[e.start:e.end])
        window.start = e.start
        out.append(StepEntry(window, e.block_table, e.start, e.end, e.state_slot))
    return out


def _reason(e: Exception) -> str:
    """gloo's "[.../pair.cc:553] Connection closed by peer [127.0.0.1]:1190. This is typically..." -> its
    first sentence."""
    return str(e).splitlines()[0].split("] ", 1)[-1].split(". ")[0][:160]


def _reap(processes: list) -> None:
    for p in processes:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def serve_rank(runner: ModelRunner, commands) -> None:
    """Ranks 1..N-1: run rank 0's model calls until it says stop."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=commands)
        command = box[0]
        if command[0] == "stop":
            return
        if command[0] == "allocate":
            runner.allocate_state(*command[1:])
        elif command[0] == "profile":
            runner.profile_step_bytes(*command[1:])
        elif command[0] == "capture":
            runner.capture_graphs(*command[1:])
        else:
            entries, logits_all = command[1:]
            runner.execute(entries, None, logits_all)


def _check_rank_files(plan_path, num_ranks: int) -> None:
    from rdnac.plans import read_plan

    plan = read_plan(plan_path, header_only=True)
    for r, record in enumerate(plan.header["mesh"]["ranks"]):
        path = plan.path.with_name(record["file"])
        if not path.exists():
            raise PlanError(f"{plan.path}: requires rank {r}'s weights file {path} (a --tp {num_ranks} plan has "
                            "one per rank); it is missing; copy it next to the plan, or recompile")


def _load(plan_path, rank: int, group, options: dict, cls=ModelRunner) -> ModelRunner:
    return cls.load(plan_path, rank=rank, group=group, **options)


def _handshake(rank: int, error: str | None, num_ranks: int) -> None:
    """Every rank says whether it loaded; any failure is raised on every rank, naming the rank."""
    statuses: list = [None] * num_ranks
    dist.all_gather_object(statuses, error)
    bad = [(r, s) for r, s in enumerate(statuses) if s]
    if bad:
        r, message = bad[0]
        raise RdnacError(message if r == rank else f"rank {r} failed to load: {message}")


def _backend(options: dict) -> str:
    """NCCL (RCCL on ROCm: torch's "nccl" backend) for a GPU plan on GPUs; gloo on the CPU (and under
    --interpret)."""
    return "nccl" if options["device"] == "cuda" and not options["interpret"] else "gloo"


def _bind_device(local_rank: int, num_ranks: int, options: dict) -> None:
    """A rank on GPUs uses GPU `local_rank` of its host, set before anything touches the device (its
    weights, kernels and graphs then land there); on the CPU, its share of the cores."""
    if _backend(options) == "nccl":
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_ranks))


def _rank_main(rank: int, num_ranks: int, init_method: str, plan_path: str, options: dict) -> None:
    """A started rank (1..N-1): join, load its weights, serve rank 0's calls, leave."""
    _bind_device(rank, num_ranks, options)
    try:
        dist.init_process_group(_backend(options), init_method=init_method, rank=rank, world_size=num_ranks,
                                timeout=_timeout())
        commands = dist.new_group(backend="gloo", timeout=_IDLE)
        runner, error = None, None
        try:
            runner = _load(plan_path, rank, dist.group.WORLD, options)
        except RdnacError as e:
            error = str(e)
        _handshake(rank, error, num_ranks)
        serve_rank(runner, commands)
        dist.destroy_process_group()
    except RdnacError:
        sys.exit(1)  # rank 0 says why
    except RuntimeError as e:  # rank 0 left or died: the group is gone
        print(f"rdnac: rank {rank}: the tensor-parallel group is down ({_reason(e)}); "
              "stopping", file=sys.stderr)
        sys.exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _options(options: dict) -> dict:
    """ModelRunner.load's options every rank takes alike."""
    return {"device": options.get("device") or "cpu", "verify_weights": options.get("verify_weights", True),
            "interpret": bool(options.get("interpret")), "enforce_eager": bool(options.get("enforce_eager")),
            "launch_pdl": options.get("launch_pdl", True)}


def _rank_flags(options: dict) -> list[str]:
    return ["--device", options["device"], *(["--no-verify-weights"] if not options["verify_weights"] else []),
            *(["--interpret"] if options["interpret"] else []),
            *(["--enforce-eager"] if options["enforce_eager"] else []),
            *(["--no-pdl"] if not options["launch_pdl"] else [])]


def start(plan_path, num_ranks: int, **options) -> TPRunner:
    """Rank 0's runner of a `num_ranks` plan, the other ranks started (or joined, under torchrun)."""
    options = _options(options)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    processes = []
    if dist.is_initialized() or world > 1:  # torchrun (or a caller that set the group up)
        if not dist.is_initialized():
            _bind_device(int(os.environ.get("LOCAL_RANK", "0")), world, options)
            dist.init_process_group(_backend(options), timeout=_timeout())
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != num_ranks:
            raise RdnacError(f"{plan_path}: a --tp {num_ranks} plan requires {num_ranks} ranks; got {world} "
                             f"(torchrun --nproc-per-node {world}); start it with --nproc-per-node {num_ranks}, "
                             "or without torchrun (rdnac starts the ranks itself)")
        commands = dist.new_group(backend="gloo", timeout=_IDLE)
        if rank != 0:  # torchrun's other ranks: serve rank 0, then end the process as the launcher expects
            error, runner = None, None
            try:
                runner = _load(plan_path, rank, dist.group.WORLD, options)
            except RdnacError as e:
                error = str(e)
            _handshake(rank, error, num_ranks)
            serve_rank(runner, commands)
            dist.destroy_process_group()
            raise SystemExit(0)
    else:
        _check_rank_files(plan_path, num_ranks)
        if _backend(options) == "nccl" and torch.cuda.device_count() < num_ranks:
            raise RdnacError(f"{plan_path}: a --tp {num_ranks} plan on GPUs requires {num_ranks} GPUs visible to "
                             f"this process (one per rank); got {torch.cuda.device_count()}; check "
                             "CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES, or run under torchrun across machines")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        for rank in range(1, num_ranks):
            processes.append(subprocess.Popen([sys.executable, "-m", "rdnac.runtime.distributed", str(plan_path),
                                               "--rank", str(rank), "--num-ranks", str(num_ranks),
                                               "--init-method", init_method, *_rank_flags(options)]))
        _bind_device(0, num_ranks, options)
        try:
            dist.init_process_group(_backend(options), init_method=init_method, rank=0, world_size=num_ranks,
                                    timeout=_timeout())
            commands = dist.new_group(backend="gloo", timeout=_IDLE)
        except RuntimeError as e:  # the ranks never met (a port taken meanwhile, a rank that failed to start)
            for p in processes:
                p.kill()
            _reap(processes)
            raise RdnacError(f"{plan_path}: starting {num_ranks} ranks requires them to join over gloo on "
                             f"{init_method}; got {_reason(e)}; retry, or run under torchrun") from None
    runner, error = None, None
    try:
        runner = _load(plan_path, 0, dist.group.WORLD, options, TPRunner)
    except RdnacError as e:
        error = str(e)
    try:
        _handshake(0, error, num_ranks)
    except RdnacError:
        _reap(processes)
        dist.destroy_process_group()
        raise
    runner.group, runner.commands, runner.processes = dist.group.WORLD, commands, processes
    atexit.register(runner.close)
    return runner


if __name__ == "__main__":  # a rank rank 0 started (`start`)
    parser = argparse.ArgumentParser(description="one rank of a tensor-parallel rdnac plan (started by rank 0)")
    parser.add_argument("plan")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--num-ranks", type=int, required=True)
    parser.add_argument("--init-method", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-verify-weights", action="store_true")
    parser.add_argument("--interpret", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--no-pdl", action="store_true")
    a = parser.parse_args()
    _rank_main(a.rank, a.num_ranks, a.init_method, a.plan,
               _options({"device": a.device, "verify_weights": not a.no_verify_weights, "interpret": a.interpret,
                         "enforce_eager": a.enforce_eager, "launch_pdl": not a.no_pdl}))
