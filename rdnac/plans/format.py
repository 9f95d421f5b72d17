"""Plan file format: `PLAN.msgpack` plus a `PLAN.weights.safetensors` sidecar.

The msgpack file is one map:

    {"format": "rdnac-plan", "format_version": 2, "header": {...},
     "body_sha256": <hex>, "body": <bytes: msgpack map>}

The header is readable without decoding the body (rdnac version, Triton
version, target, model identity, compile options, the weights file's name,
size and sha256). The body holds the graph, decision log, kernels, program,
runtime defaults, tokenizer, chat template and generation config. Loading
checks the format version first, then the body hash, then the weights size
and hash, and never executes anything carried in the plan (no pickle).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import msgpack
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rdnac.errors import GraphError, PlanError
from rdnac.plans.schema import check_body, check_header

FORMAT = "rdnac-plan"
FORMAT_VERSION = 2  # 2: the graph declares the model's state (Graph.state, ir/state.py); 1 assumed K/V caches
# safetensors dtype names -> the graph's dtype names
_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
              "I32": "int32", "I8": "int8", "U8": "uint8", "F8_E4M3": "float8_e4m3fn",
              "F8_E4M3FNUZ": "float8_e4m3fnuz", "BOOL": "bool"}


def weights_path_for(plan_path: Path) -> Path:
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name.removesuffix(".msgpack") + ".weights.safetensors")


def _new_file_mode() -> int:
    """The mode open() gives a new file here: 0666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


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

    def load_weights(self, device: str = "cpu", verify: bool = False) -> dict[str, torch.Tensor]:
        """The plan's weights, read straight onto `device`.

        Always checked: the file's size, and that its tensors are exactly the graph's weights with
        their recorded dtypes and shapes. With `verify`, also the file's sha256 against the plan's
        record (a full read: seconds per GB, so it is asked for, e.g. `rdnac run --verify-weights`)."""
        path = self.weights_path
        info = self.header["weights"]
        if not path.exists():
            raise PlanError(f"{self.path}: requires its weights file {path}; it is missing (copy it next to the plan)")
        size = path.stat().st_size
        if size != info["size"]:
            raise PlanError(f"{path}: weights file size {size} does not match the plan's record {info['size']}; "
                            "the file is truncated or from another compile; recompile or copy the matching file")
        if verify and _sha256_file(path) != info["sha256"]:
            raise PlanError(f"{path}: weights sha256 does not match the plan's record; the file is corrupt or "
                            "from another compile; recompile or copy the matching file")
        specs = self.body["graph"]["weights"]
        out = {}
        with safe_open(str(path), framework="pt", device=device) as f:
            names = set(f.keys())
            if names != set(specs):
                missing, extra = sorted(set(specs) - names), sorted(names - set(specs))
                raise PlanError(f"{path}: requires the tensors of the plan's graph; missing {missing[:3]}, "
                                f"unexpected {extra[:3]}; recompile or copy the matching file")
            for name in specs:
                sl = f.get_slice(name)
                shape, dtype = list(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype())
                want = specs[name]
                if shape != list(want["shape"]) or dtype != want["dtype"]:
                    raise PlanError(f"{path}: tensor {name!r} is {dtype} {shape}; the plan's graph requires "
                                    f"{want['dtype']} {list(want['shape'])}; recompile or copy the matching file")
                out[name] = f.get_tensor(name)
        return out


def write_plan(path: Path, header: dict, body: dict, weights: dict[str, torch.Tensor]) -> Path:
    path = Path(path)
    wpath = weights_path_for(path)
    tmp_w = wpath.with_name(wpath.name + ".tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_w), metadata={"format": FORMAT})
    tmp_w.chmod(_new_file_mode())  # safetensors creates 0600; the weights are as readable as the plan
    tmp_w.replace(wpath)
    header = dict(header, weights={"file": wpath.name, "size": wpath.stat().st_size, "sha256": _sha256_file(wpath)})
    body_bytes = msgpack.packb(body, use_bin_type=True)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "header": header,
           "body_sha256": hashlib.sha256(body_bytes).hexdigest(), "body": body_bytes}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgpack.packb(doc, use_bin_type=True))
    tmp.replace(path)
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
