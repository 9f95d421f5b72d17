"""Plan file format: `PLAN.msgpack` plus a `PLAN.weights.safetensors` sidecar.

The msgpack file is one map:

    {"format": "rdnac-plan", "format_version": 2, "header": {...},
     "body_sha256": <hex>, "body": <bytes: msgpack map>}

The header is readable without decoding the body (rdnac version, Triton
version, target, model identity, compile options, the weights file's name,
size, sha256 and per-tensor checksums; see weights_file.py). The body holds
the graph, decision log, kernels, program, runtime defaults, tokenizer, chat
template and generation config. Loading checks the format version first,
then the body hash, then the weights size and checksums, and never executes
anything carried in the plan (no pickle). `write_plan` publishes the plan and
its weights together: both are written to temporary names and renamed into
place only once both are complete.

A plan sharded over N ranks (`rdnac compile --tp N`) has one weights file per
rank, `PLAN.rank<r>.weights.safetensors`, so a rank reads only its own
bytes; `header.mesh` = {"tp": N, "ep": bool, "ranks": [the record of each
rank's file]} and `header.weights` is rank 0's record.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import msgpack
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from rdnac.errors import GraphError, PlanError
from rdnac.plans.schema import check_body, check_header
from rdnac.plans.weights_file import CHECKSUM, ST_DTYPES, read_header, read_weights, record_weights, sha256_file

FORMAT = "rdnac-plan"
FORMAT_VERSION = 2  # 2: the graph declares the model's state (Graph.state, ir/state.py); 1 assumed K/V caches


def weights_path_for(plan_path: Path, rank: int | None = None) -> Path:
    """The weights sidecar of a plan, or of one rank of a sharded plan."""
    plan_path = Path(plan_path)
    tag = "" if rank is None else f".rank{rank}"
    return plan_path.with_name(plan_path.name.removesuffix(".msgpack") + tag + ".weights.safetensors")


@dataclass
class Plan:
    path: Path
    header: dict
    body: dict

    def graph(self):
        """The plan's `Graph`; a declared state this rdnac does not know is refused here, naming it."""
        from rdnac.ir.graph import Graph
        from rdnac.ir.state import UnknownStateError

        if "state" not in self.body["graph"]:  # format 1 read by hand: the version check refuses it first
            raise PlanError(f"{self.path}: requires a plan that declares its model state; this one declares "
                            f"none (compiled by an older rdnac); recompile the model with this rdnac")
        from rdnac.ir.verify import verify

        try:
            graph = Graph.from_dict(self.body["graph"])
            verify(graph)
        except UnknownStateError as e:
            raise PlanError(f"{self.path}: {e}") from None
        except GraphError as e:  # its message ends with the graph dump: the first line names the node
            raise PlanError(f"{self.path}: {str(e).splitlines()[0]}; the plan file is corrupt; recompile it") from None
        return graph

    @property
    def weights_path(self) -> Path:
        return self.path.with_name(self.header["weights"]["file"])

    @property
    def num_ranks(self) -> int:
        """The ranks the plan was sharded over (`rdnac compile --tp N`); 1 for a plan that is not."""
        mesh = self.header.get("mesh")
        return int(mesh["tp"]) if mesh else 1

    def load_weights(self, device: str = "cpu", verify: bool = True, rank: int = 0) -> dict[str, torch.Tensor]:
        """The plan's weights, read onto `device`.

        Always checked: the file's size, and that its tensors are exactly the graph's weights with
        their recorded dtypes and shapes. With `verify` (the default), each tensor's bytes against the
        checksum the plan records, while they stream in (`weights_file.read_weights`); a plan without
        per-tensor checksums is checked against the whole file's sha256 instead (a second full read).
        A sharded plan's `rank` reads its own file only."""
        assert 0 <= rank < self.num_ranks, (rank, self.num_ranks)
        info = self.header["mesh"]["ranks"][rank] if self.num_ranks > 1 else self.header["weights"]
        path = self.path.with_name(info["file"])
        if not path.exists():
            whose = f"rank {rank}'s weights file" if self.num_ranks > 1 else "its weights file"
            raise PlanError(f"{self.path}: requires {whose} {path}; it is missing (copy it next to the plan, or "
                            "recompile)")
        size = path.stat().st_size
        if size != info["size"]:
            raise PlanError(f"{path}: weights file size {size} does not match the plan's record {info['size']}; "
                            "the file is truncated or from another compile; recompile or copy the matching file")
        checksums = info.get("tensors") if verify else None
        if verify and checksums is None and sha256_file(path) != info["sha256"]:
            raise PlanError(f"{path}: weights sha256 does not match the plan's record; the file is corrupt or "
                            "from another compile; recompile or copy the matching file")
        if checksums is not None and (info.get("checksum") != CHECKSUM or not isinstance(checksums, dict)):
            raise PlanError(f"{self.path}: requires weight checksums of kind {CHECKSUM}; got "
                            f"{info.get('checksum')!r}; recompile the plan with this rdnac")
        specs = self.body["graph"]["weights"]
        header = read_header(path)
        entries = header[1]
        if set(entries) != set(specs):
            missing, extra = sorted(set(specs) - set(entries)), sorted(set(entries) - set(specs))
            raise PlanError(f"{path}: requires the tensors of the plan's graph; missing {missing[:3]}, "
                            f"unexpected {extra[:3]}; recompile or copy the matching file")
        for name, want in specs.items():
            entry = entries[name]
            if not _is_entry(entry):
                raise PlanError(f"{path}: tensor {name!r} requires a safetensors entry (dtype, shape of ints, two "
                                f"data offsets); got {str(entry)[:80]}; recompile or copy the matching file")
            shape, dtype = list(entry["shape"]), ST_DTYPES.get(entry["dtype"])
            if shape != list(want["shape"]) or dtype is None or str(dtype).removeprefix("torch.") != want["dtype"]:
                got = str(dtype).removeprefix("torch.") if dtype is not None else entry.get("dtype")
                raise PlanError(f"{path}: tensor {name!r} is {got} {shape}; the plan's graph requires "
                                f"{want['dtype']} {list(want['shape'])}; recompile or copy the matching file")
            begin, end = entry["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize or header[0] + end > size:
                raise PlanError(f"{path}: tensor {name!r} has data offsets {[begin, end]} that do not fit "
                                f"{want['dtype']} {shape} in the file; recompile or copy the matching file")
        return read_weights(path, header, list(specs), device, checksums, self.path)


def _is_entry(entry) -> bool:
    ints = lambda xs, n=None: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs) \
        and (n is None or len(xs) == n)  # noqa: E731
    return isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and ints(entry.get("shape")) \
        and ints(entry.get("data_offsets"), 2)


def _temp_beside(path: Path) -> Path:
    """A fresh name in `path`'s directory for writing `path` before it is published by a rename."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata={"format": FORMAT})
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _publish(weights: list[tuple[Path, Path]], tmp_plan: Path, plan: Path) -> None:
    """Rename the new weights files (`(temporary, final)` pairs: one, or one per rank of a sharded plan),
    then the new plan, into place. The plan records every weights file's size and checksums, so until its
    rename lands an old plan beside new weights is refused at load; if any rename fails, every weights
    file already renamed is put back as it was (or removed, where none was there), leaving the old plan
    and its files as they were."""
    backups: list[Path | None] = []
    for _, final in weights:
        backup = None
        if final.exists():
            backup = _temp_beside(final)
            try:
                os.link(final, backup)
            except OSError:  # no hard links here: the plan's checksums still refuse a mismatched pair
                backup = None
        backups.append(backup)
    done = 0
    try:
        for tmp, final in weights:
            os.replace(tmp, final)
            done += 1
        os.replace(tmp_plan, plan)
    except OSError:
        for (_, final), backup in zip(weights[:done], backups):
            if backup is not None:
                os.replace(backup, final)
            else:
                final.unlink(missing_ok=True)
        raise
    finally:
        for backup in backups:
            if backup is not None:
                backup.unlink(missing_ok=True)


def _io_reason(message: str) -> str:
    """"No space left on device" out of safetensors' "Error while serializing: I/O error: ... (os error 28)"."""
    m = re.search(r"I/O error: (.*?) \(os error \d+\)", message)
    return m.group(1) if m else message.splitlines()[0]


def write_plan(path: Path, header: dict, body: dict, weights: dict[str, torch.Tensor],
               rank_weights: list[dict[str, torch.Tensor]] | None = None) -> Path:
    """Write the plan and its weights to temporary names beside `path`, then publish both (`_publish`).
    On any failure (a full disk, an unwritable directory) the temporaries are removed, an existing plan
    and its weights are left as they were, and a PlanError says why. `rank_weights` (a sharded plan):
    one weights file per rank, `weights` being rank 0's, all published with the plan (or none of them)."""
    path = Path(path)
    num_ranks = len(rank_weights) if rank_weights else 1
    wpaths = [weights_path_for(path, r if rank_weights else None) for r in range(num_ranks)]
    tmps = [_temp_beside(w) for w in wpaths]
    tmp_p = _temp_beside(path)
    try:
        records = []
        for r, (tmp, final) in enumerate(zip(tmps, wpaths)):
            _save_weights(tmp, rank_weights[r] if rank_weights else weights)
            records.append({"file": final.name, **record_weights(tmp)})
        header = dict(header, weights=records[0])
        if rank_weights:
            header["mesh"] = {"tp": num_ranks, "ep": bool(header.get("compile_options", {}).get("ep")),
                              "ranks": records}
        body_bytes = msgpack.packb(body, use_bin_type=True)
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "header": header,
               "body_sha256": hashlib.sha256(body_bytes).hexdigest(), "body": body_bytes}
        _write_synced(tmp_p, msgpack.packb(doc, use_bin_type=True))
        for tmp in tmps:  # safetensors makes it 0600; the plan has the umask's
            os.chmod(tmp, stat.S_IMODE(tmp_p.stat().st_mode))
        _publish(list(zip(tmps, wpaths)), tmp_p, path)
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else _io_reason(str(e))
        raise PlanError(f"{path}: writing the plan requires a writable directory with room for it and its "
                        f"weights; got {reason}; nothing was written (an existing plan is unchanged); free "
                        "space or choose another -o") from None
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        tmp_p.unlink(missing_ok=True)
    return path


def read_plan(path: Path | str, *, header_only: bool = False) -> Plan:
    path = Path(path)
    if not path.exists():
        raise PlanError(f"{path}: no such plan file")
    try:
        doc = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException, ValueError, TypeError) as e:
        raise PlanError(f"{path}: truncated or corrupt plan file ({type(e).__name__}); recompile it") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PlanError(f"{path}: not an rdnac plan (requires format {FORMAT!r}); was it written by rdnac compile?")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise PlanError(f"{path}: plan format version {version} is not supported by this rdnac "
                        f"(reads version {FORMAT_VERSION}); recompile the model with this rdnac")
    body_bytes = doc.get("body")
    if not isinstance(body_bytes, bytes) or hashlib.sha256(body_bytes).hexdigest() != doc.get("body_sha256"):
        raise PlanError(f"{path}: plan body does not match its sha256; the file is corrupt; recompile it")
    check_header(path, doc.get("header"))
    if header_only:
        return Plan(path, doc["header"], {})
    try:
        body = msgpack.unpackb(body_bytes, raw=False, strict_map_key=False)
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException, ValueError, TypeError) as e:
        raise PlanError(f"{path}: corrupt plan body ({type(e).__name__}); recompile it") from None
    check_body(path, body)
    return Plan(path, doc["header"], body)
