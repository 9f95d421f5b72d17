"""Random damage to a plan, a safetensors checkpoint and a GGUF ends in one typed rdnac error, never a traceback.

Seeded and in-process: each mutated file is loaded (and a plan that loads is run: token ids, a text prompt
and a chat turn, one token each), and anything raised must be one of `rdnac.errors`' types with a
one-line message. A mutation that still loads and runs is fine (a changed theta is still a model). A few
mutations go through the real CLI too, to see that no traceback is printed. Nothing may be left behind in
the working directory but the mutated inputs themselves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.errors import RdnacError
from tests.support.checkpoints import make_checkpoint

NUM_PLAN_MUTATIONS = 2000
NUM_FILE_MUTATIONS = 200
# Values a mutation puts in place of another: each type msgpack carries, and the edge values of each.
ODD_VALUES = [None, True, False, 0, -1, 1, 3, 7, 2**31, 2**63, -(2**63), 2**64 - 1, 1.5, -0.0, math.nan, math.inf,
              -math.inf, "", "x", "float32", "silu", "k_cache.0", b"", b"\x00\xff", [], [1], ["x"], {}, {"a": 1},
              {"name": "x"}]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: torch's thread pool only spins (20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- mutations of a msgpack/JSON structure


def _paths(value, prefix=()):
    """Every (path, value) inside a nested structure of maps and lists, the root included."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _get(root, path):
    for key in path:
        root = root[key]
    return root


def _set(root, path, value):
    _get(root, path[:-1])[path[-1]] = value


def mutate(doc, rng: random.Random) -> str:
    """One random structural edit of `doc` in place; returns what it did (for the failure message)."""
    paths = [p for p, _ in _paths(doc) if p]
    path = rng.choice(paths)
    value = _get(doc, path)
    kind = rng.choice(("delete", "retype", "retype", "swap", "truncate", "flip"))
    if kind == "delete":
        parent = _get(doc, path[:-1])
        del parent[path[-1]]
    elif kind == "retype":
        _set(doc, path, rng.choice(ODD_VALUES))
    elif kind == "swap":
        other = rng.choice(paths)
        if other[:len(path)] == path or path[:len(other)] == other:  # one holds the other: copy instead
            _set(doc, path, json.loads(json.dumps(_get(doc, other), default=repr)))
        else:
            a, b = _get(doc, path), _get(doc, other)
            _set(doc, path, b)
            _set(doc, other, a)
        return f"swap {path} <-> {other}"
    elif kind == "truncate":
        if isinstance(value, (str, bytes, list)):
            _set(doc, path, value[:rng.randrange(len(value) + 1)] if value else value)
        elif isinstance(value, dict):
            keep = rng.sample(sorted(value, key=str), rng.randrange(len(value) + 1))
            _set(doc, path, {k: value[k] for k in keep})
    else:  # flip a bit of a scalar
        if isinstance(value, bool):
            _set(doc, path, not value)
        elif isinstance(value, int):
            _set(doc, path, value ^ (1 << rng.randrange(64)))
        elif isinstance(value, float):
            raw = struct.unpack("<Q", struct.pack("<d", value))[0] ^ (1 << rng.randrange(64))
            _set(doc, path, struct.unpack("<d", struct.pack("<Q", raw))[0])
        elif isinstance(value, (str, bytes)) and value:
            i = rng.randrange(len(value))
            if isinstance(value, str):
                _set(doc, path, value[:i] + chr((ord(value[i]) ^ (1 << rng.randrange(7))) or 1) + value[i + 1:])
            else:
                _set(doc, path, value[:i] + bytes([value[i] ^ (1 << rng.randrange(8))]) + value[i + 1:])
    return f"{kind} {path}"


def _check_one_line(error: BaseException, what: str) -> None:
    assert isinstance(error, RdnacError), f"{what}: {type(error).__name__}: {error}"
    message = str(error)
    assert message and "\n" not in message, f"{what}: not one line: {message!r}"


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


# ---------------------------------------------------------------- plans


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-plan")
    make_checkpoint("llama", root / "ckpt", num_hidden_layers=1)
    return rdnac.compile(root / "ckpt", output=root / "p.msgpack", quiet=True)


def _exercise_plan(path: Path) -> None:
    """Load and run one token three ways: what `rdnac run` and the API do with a plan."""
    llm = rdnac.load(path, num_blocks=4, max_num_seqs=1)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=1))
    if llm.tokenizer.has_tokenizer:
        llm.generate(["hi"], SamplingParams(max_tokens=1))
        if llm.tokenizer.chat_template:
            llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1))


def _write_plan(doc: dict, body: dict | None, out: Path) -> None:
    """`doc` as a plan file, its body packed and hashed again when given (so the mutation reaches the loader)."""
    if body is not None:
        doc["body"] = msgpack.packb(body, use_bin_type=True)
        doc["body_sha256"] = hashlib.sha256(doc["body"]).hexdigest()
    out.write_bytes(msgpack.packb(doc, use_bin_type=True))


def test_plan_mutations_end_in_one_typed_line(plan, tmp_path):
    rng = random.Random(23)
    original = msgpack.unpackb(plan.read_bytes(), raw=False)
    original_body = msgpack.unpackb(original["body"], raw=False, strict_map_key=False)
    os.link(plan.with_name("p.weights.safetensors"), tmp_path / "p.weights.safetensors")
    out = tmp_path / "p.msgpack"
    _exercise_plan(plan)  # the unmutated plan runs
    before = _files(tmp_path) | {"p.msgpack"}
    counts = {"refused": 0, "ran": 0}
    for i in range(NUM_PLAN_MUTATIONS):
        doc = dict(original)
        body = None
        roll = rng.random()
        if roll < 0.05:  # raw damage to the file's bytes: the hash or msgpack refuses it
            _write_plan(doc, None, out)
            data = bytearray(out.read_bytes())
            if rng.random() < 0.5:
                data = data[:rng.randrange(len(data))]
            else:
                for _ in range(rng.randrange(1, 4)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            out.write_bytes(bytes(data))
            what = "raw bytes"
        elif roll < 0.2:  # the header and the outer document (the hash does not cover them)
            doc = msgpack.unpackb(msgpack.packb(original, use_bin_type=True), raw=False)
            what = "doc: " + mutate(doc, rng)
            _write_plan(doc, None, out)
        else:  # the body, hashed again: mostly the graph, the runtime defaults and the tokenizer
            body = msgpack.unpackb(msgpack.packb(original_body, use_bin_type=True), raw=False, strict_map_key=False)
            focus = rng.choice(("graph", "graph", "runtime", "tokenizer", "generation_config", None))
            what = "body: " + mutate(body if focus is None or focus not in body else {focus: body[focus]}, rng)
            _write_plan(doc, body, out)
        try:
            _exercise_plan(out)
            counts["ran"] += 1
        except Exception as e:  # noqa: BLE001 -- the assertion is that it is one of rdnac's typed errors
            _check_one_line(e, f"mutation {i} ({what})")
            counts["refused"] += 1
    assert _files(tmp_path) == before, sorted(_files(tmp_path) - before)
    assert counts["refused"] > NUM_PLAN_MUTATIONS // 2, counts  # the mutations reach the checks


def test_damaged_plans_through_the_cli_print_one_line(plan, tmp_path):
    """The real CLI in a subprocess: a few damaged plans each give exit 1 and one `error:` line on stderr."""
    original = msgpack.unpackb(plan.read_bytes(), raw=False)
    body = msgpack.unpackb(original["body"], raw=False, strict_map_key=False)
    os.link(plan.with_name("p.weights.safetensors"), tmp_path / "p.weights.safetensors")
    edits = [
        lambda b: b["graph"]["nodes"][2].update(inputs={"a": 1}),  # unhashable where names are expected
        lambda b: b["graph"]["nodes"][3]["attrs"].update(num_heads="six"),
        lambda b: b["tokenizer"].update(json='{"model": 5'),
        lambda b: b["graph"]["state"].pop(),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for n, edit in enumerate(edits):
        damaged = msgpack.unpackb(msgpack.packb(body, use_bin_type=True), raw=False, strict_map_key=False)
        edit(damaged)
        _write_plan(dict(original), damaged, tmp_path / "p.msgpack")
        result = subprocess.run([sys.executable, "-m", "rdnac.cli.main", "run", str(tmp_path / "p.msgpack"),
                                 "--prompt", "hi", "--max-tokens", "1"], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 1, (n, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("error: "), \
            (n, result.stderr)
    assert _files(tmp_path) == {"p.msgpack", "p.weights.safetensors"}


# ---------------------------------------------------------------- safetensors checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz-ckpt") / "ckpt"
    make_checkpoint("llama", directory, num_hidden_layers=1)
    return directory


def test_safetensors_header_mutations_end_in_one_typed_line(checkpoint, tmp_path):
    from rdnac.compiler.frontend import build_graph, read_checkpoint

    rng = random.Random(23)
    work = tmp_path / "ckpt"
    shutil.copytree(checkpoint, work)
    data = (checkpoint / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    payload = data[8 + header_len:]
    before = _files(work)
    for i in range(NUM_FILE_MUTATIONS):
        if rng.random() < 0.2:  # the raw header bytes: length prefix, JSON syntax
            raw = bytearray(data[:8 + header_len])
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            blob, what = bytes(raw) + payload, "raw header bytes"
        else:
            h = json.loads(json.dumps(header))
            what = mutate(h, rng)
            text = json.dumps(h, default=lambda b: b.decode("latin-1")).encode()  # bytes: as a string
            blob = struct.pack("<Q", len(text)) + text + payload
        (work / "model.safetensors").write_bytes(blob)
        try:
            ckpt = read_checkpoint(work)
            build_graph(ckpt, "float32")
        except Exception as e:  # noqa: BLE001 -- the assertion is that it is one of rdnac's typed errors
            _check_one_line(e, f"mutation {i} ({what})")
    assert _files(work) == before


# ---------------------------------------------------------------- GGUF files


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    from tests.test_gguf_reader import write_tiny

    path = tmp_path_factory.mktemp("fuzz-gguf") / "tiny.gguf"
    write_tiny(path, "qwen2", "gpt2", bias=True)
    return path


def test_gguf_mutations_end_in_one_typed_line(gguf_file, tmp_path):
    from rdnac.compiler.frontend import build_graph, read_checkpoint

    rng = random.Random(23)
    data = gguf_file.read_bytes()
    out = tmp_path / "m.gguf"
    for i in range(NUM_FILE_MUTATIONS):
        blob = bytearray(data)
        if rng.random() < 0.3:
            blob = blob[:rng.randrange(len(blob))]
            what = f"truncated to {len(blob)}"
        else:
            # the metadata and tensor infos sit in the first bytes; flip there mostly
            span = min(len(blob), 4096) if rng.random() < 0.8 else len(blob)
            spots = [rng.randrange(span) for _ in range(rng.randrange(1, 4))]
            for j in spots:
                blob[j] ^= 1 << rng.randrange(8)
            what = f"bit flips at {spots}"
        out.write_bytes(bytes(blob))
        started = time.perf_counter()
        try:
            ckpt = read_checkpoint(out)
            build_graph(ckpt, "float32")
        except Exception as e:  # noqa: BLE001 -- the assertion is that it is one of rdnac's typed errors
            _check_one_line(e, f"mutation {i} ({what})")
        # promptly: a damaged array length once sent the gguf package through phantom entries for 30 s
        assert time.perf_counter() - started < 5, f"mutation {i} ({what}) took {time.perf_counter() - started:.0f} s"
    assert _files(tmp_path) == {"m.gguf"}


# ---------------------------------------------------------------- GPU plans: kernels, program, launch fields

NUM_GPU_PLAN_MUTATIONS = 600  # per target: 1,200 in all
# Kernel names a tampered plan might hold: modules outside rdnac's kernel library (never imported: checked),
# the library's non-kernels, another real kernel, malformed names.
HOSTILE_KERNELS = ["poplib:POP3", "wave:open", "mailbox:mbox", "tabnanny:check", "os:system",
                   "evil_sentinel:system", "rdnac.compiler.build:compile_calls", "rdnac.kernels.registry:wrapper",
                   "rdnac.kernels.gemm:linear", "rdnac.kernels.gemm:_gemm_kernel", "rdnac.kernels.rms_norm:nonexistent",
                   "rdnac.kernels:x", "rdnac.kernelsx.gemm:_gemm_kernel", "rdnac.kernels.gemm", ":", "",
                   "rdnac.kernels.gemm:_gemm_kernel:x"]
HOSTILE_WRAPPERS = ["poplib.POP3", "mailbox.mbox", "tabnanny.check", "os.system", "registry.wrapper",
                    "gemm.config_space", "gemm.linear", "rms_norm.rms_norm", "attention.attention_prefill", "gemm", "",
                    "gemm.linear.x"]
NEVER_IMPORTED = ("poplib", "wave", "mailbox", "tabnanny", "evil_sentinel")


@pytest.fixture(scope="module")
def gpu_plans(tmp_path_factory) -> dict[str, Path]:
    """One-layer plans cross-compiled for an NVIDIA and an AMD target (no GPU needed)."""
    root = tmp_path_factory.mktemp("fuzz-gpu")
    make_checkpoint("llama", root / "ckpt", num_hidden_layers=1)
    return {target: rdnac.compile(root / "ckpt", target=target, output=root / f"{target}.msgpack", quiet=True,
                                  max_num_seqs=2, max_num_batched_tokens=16) for target in ("sm90", "gfx1201")}


def _load_gpu_plan(path: Path) -> None:
    """What loading a GPU plan on a machine without one does: the plan's schema, its kernels and program checked
    against rdnac's kernel library (runtime/kernel_check.py), its graph and weights, the executor built."""
    from rdnac.runtime.model_runner import ModelRunner

    ModelRunner.load(path, interpret=True)


def mutate_gpu(doc: dict, body: dict, rng: random.Random) -> tuple[str, bool]:
    """One random edit of a GPU plan's kernel, program or launch fields (in place); returns what it did and
    whether the load must refuse it (a name outside what the plan had, bytes that no longer match)."""
    kernels, program = body["kernels"], body["program"]
    k = rng.choice(kernels)
    node = rng.choice(sorted(program))
    key = rng.choice(sorted(program[node]))
    roll = rng.random()
    if roll < 0.3:
        return "kernels: " + mutate({"kernels": kernels}, rng), False
    if roll < 0.42:
        return "program: " + mutate({"program": program}, rng), False
    if roll < 0.5:
        focus = rng.choice(("runtime", "state"))
        return f"{focus}: " + mutate({"runtime": body["runtime"]} if focus == "runtime"
                                     else {"state": body["graph"]["state"]}, rng), False
    if roll < 0.6:
        name, was = rng.choice(HOSTILE_KERNELS), k["kernel"]
        k["kernel"] = name
        if rng.random() < 0.7:
            k["call"]["kernel"] = name
        return f"kernel name {name!r}", name != was
    if roll < 0.68:
        name, was = rng.choice(HOSTILE_WRAPPERS), program[node][key]["kernel"]
        for choice in (program[node].values() if rng.random() < 0.5 else [program[node][key]]):
            choice["kernel"] = name
        return f"wrapper {name!r} at {node}", name != was
    if roll < 0.75:
        data = bytearray(k["binary"])
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        k["binary"] = bytes(data)
        if rng.random() < 0.5:  # with its sha256 recomputed: only the device's loader could tell
            k["sha256"] = hashlib.sha256(k["binary"]).hexdigest()
            return "binary bytes (sha256 recomputed)", False
        return "binary bytes", True
    if roll < 0.83:
        field = rng.choice(("name", "num_warps", "shared", "warp_size", "num_ctas", "launch_pdl",
                            "launch_cooperative_grid", "global_scratch_size", "target"))
        k["metadata"][field] = rng.choice(ODD_VALUES)
        return f"metadata.{field}", False
    if roll < 0.87:
        value = rng.choice(("3.6.0", "0.0", "", "9.9.9+evil", 7))
        (k if rng.random() < 0.7 else doc["header"])["triton_version"] = value
        return f"triton_version {value!r}", False  # another Triton's binary: the GPU loader rebuilds it
    if roll < 0.9:
        was = doc["header"]["target"]
        doc["header"]["target"] = rng.choice(("sm90", "gfx1201", "gfx942", "cpu", "sm100", "", 5))
        return f"header.target {doc['header']['target']!r}", doc["header"]["target"] != was
    if roll < 0.95:  # constexprs and launch configs: of a binary's call, or of a program choice
        config = k["call"] if rng.random() < 0.5 else program[node][key]["config"]
        name = rng.choice(sorted(config["constexprs"]) + ["num_warps", "num_stages", "NEW"])
        target = config if name in ("num_warps", "num_stages") else config["constexprs"]
        target[name] = rng.choice(ODD_VALUES + ["tl.dtype:bf16", "tl.dtype:evil", 1 << 20])
        return f"config {name}", False
    new = rng.choice(("decode:3", "prefill:99999", "decode", "verify:1", "decode:1", "prefill:32"))
    for steps in program.values():
        if key in steps:
            steps[new] = steps.pop(key)
    return f"step key {key} -> {new}", new != key


@pytest.mark.parametrize("target", ["sm90", "gfx1201"])
def test_gpu_plan_kernel_mutations_end_in_one_typed_line(gpu_plans, target, tmp_path):
    """Damage to a GPU plan's kernels (names, bytes, metadata, signatures, constexprs, Triton version), program
    (wrappers, configs, step keys) and launch fields, its body hash recomputed, loaded on this GPU-less machine:
    each load ends in one of rdnac's typed errors on one line, or loads; nothing outside rdnac's kernel library
    is imported, nothing is left behind."""
    plan = gpu_plans[target]
    rng = random.Random(f"gpu-{target}")
    original = msgpack.unpackb(plan.read_bytes(), raw=False)
    original_body = msgpack.unpackb(original["body"], raw=False, strict_map_key=False)
    weights = plan.with_name(f"{target}.weights.safetensors")  # the plan's header names it
    os.link(weights, tmp_path / weights.name)
    out = tmp_path / "p.msgpack"
    shutil.copyfile(plan, out)
    doc = original
    _load_gpu_plan(out)  # the unmutated plan loads
    before_files = _files(tmp_path)
    assert not [m for m in NEVER_IMPORTED if m in sys.modules], "a module the fuzz watches is imported already"
    modules = set(sys.modules)
    counts = {"refused": 0, "loaded": 0}
    for i in range(NUM_GPU_PLAN_MUTATIONS):
        mutated = msgpack.unpackb(msgpack.packb(doc, use_bin_type=True), raw=False)
        body = msgpack.unpackb(msgpack.packb(original_body, use_bin_type=True), raw=False, strict_map_key=False)
        what, must_refuse = mutate_gpu(mutated, body, rng)
        _write_plan(mutated, body, out)
        try:
            _load_gpu_plan(out)
            assert not must_refuse, f"mutation {i} ({what}) loaded"
            counts["loaded"] += 1
        except Exception as e:  # noqa: BLE001 -- the assertion is that it is one of rdnac's typed errors
            _check_one_line(e, f"mutation {i} ({what})")
            counts["refused"] += 1
        imported = sorted(m for m in set(sys.modules) - modules if not m.startswith("rdnac.kernels."))
        assert not imported, f"mutation {i} ({what}) imported {imported}"
    assert _files(tmp_path) == before_files, sorted(_files(tmp_path) ^ before_files)
    assert counts["refused"] > NUM_GPU_PLAN_MUTATIONS // 2, counts  # the mutations reach the checks
    print(f"{target}: {counts}")
