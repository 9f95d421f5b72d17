"""A plan and its weights on disk: published together or not at all, checked as they load, never code.

Issue 23 items 8 (a failed write leaves no files and an existing plan untouched), 9 (non-finite weights
refused at compile; per-tensor checksums verified at load, on by default) and 15 (a tampered plan's
kernel names resolve only inside rdnac's kernel library, and import nothing).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import msgpack
import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import rdnac
from rdnac.cli.main import cli
from rdnac.errors import CheckpointError, PlanError
from rdnac.plans import format as plan_format
from rdnac.plans import read_plan, write_plan
from tests.support.checkpoints import make_checkpoint

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "llama"
    make_checkpoint("llama", directory)
    return directory


@pytest.fixture(scope="module")
def plan(checkpoint, tmp_path_factory):
    return rdnac.compile(checkpoint, output=tmp_path_factory.mktemp("plan") / "llama.msgpack")


def _one_line_error(args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _copy_plan(plan, directory):
    directory.mkdir(exist_ok=True)
    for name in (plan.name, plan.name.replace(".msgpack", ".weights.safetensors")):
        shutil.copy(plan.with_name(name), directory / name)
    return directory / plan.name


# ------------------------------------------------------------------ item 8: publish together or not at all


def _fail_saving_weights(monkeypatch, out):
    real = plan_format.save_file

    def half_then_full(tensors, path, metadata=None):  # the disk fills part-way through the weights
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(plan_format, "save_file", half_then_full)


def _fail_writing_plan(monkeypatch, out):
    real = plan_format._write_synced

    def half_then_full(path, data):  # the weights fit; the plan file does not
        real(path, data[: len(data) // 2])
        raise ENOSPC
    monkeypatch.setattr(plan_format, "_write_synced", half_then_full)


def _fail_hashing(monkeypatch, out):
    def read_error(path):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(plan_format, "record_weights", read_error)


def _fail_renaming_plan(monkeypatch, out):
    real = os.replace

    def refuse_plan(src, dst):  # the weights are already in place when the plan's rename fails
        if os.fspath(dst) == os.fspath(out):
            raise ENOSPC
        real(src, dst)
    monkeypatch.setattr(plan_format.os, "replace", refuse_plan)


STAGES = {"weights": _fail_saving_weights, "hashing": _fail_hashing, "plan": _fail_writing_plan,
          "rename": _fail_renaming_plan}


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "over-existing"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_failed_write_leaves_no_new_files_and_the_old_plan_whole(plan, tmp_path, monkeypatch, stage, existing):
    src = read_plan(plan)
    weights = src.load_weights()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "llama.msgpack"
    if existing:
        _copy_plan(plan, out_dir)
    before = _files(out_dir)
    changed = {k: v + 1 for k, v in weights.items() if v.is_floating_point()}  # a different model to write
    STAGES[stage](monkeypatch, out)
    with pytest.raises(PlanError) as e:
        write_plan(out, src.header, src.body, changed)
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and "nothing was written" in msg, msg
    if stage != "hashing":
        assert "No space left on device" in msg, msg
    monkeypatch.undo()
    assert _files(out_dir) == before, sorted(_files(out_dir))  # no temporaries, no orphans, old pair intact
    if existing:
        loaded = read_plan(out).load_weights()
        assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_a_full_disk_at_compile_is_one_line_and_no_files(checkpoint, plan, tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    out = _copy_plan(plan, out_dir)
    before = _files(out_dir)
    _fail_writing_plan(monkeypatch, out)
    line = _one_line_error(["compile", checkpoint, "--target", "cpu", "-o", out, "--max-model-len", "64"])
    assert "No space left on device" in line and str(out) in line, line
    monkeypatch.undo()
    assert _files(out_dir) == before


def test_a_written_pair_has_the_plans_mode_and_checksums(plan):
    weights = plan.with_name("llama.weights.safetensors")
    assert (weights.stat().st_mode & 0o777) == (plan.stat().st_mode & 0o777)  # not 0600 beside a 0644 plan
    record = read_plan(plan, header_only=True).header["weights"]
    assert record["checksum"] == "xxh3_64" and set(record["tensors"]) == set(load_file(weights))
    assert not [p for p in plan.parent.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ item 9: non-finite weights, checksums


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_compile(checkpoint, tmp_path, value):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][3, 5] = value
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out" / "bad.msgpack"
    out.parent.mkdir()
    line = _one_line_error(["compile", bad, "--target", "cpu", "-o", out])
    assert f"tensor {name!r} requires finite values; got 1 NaN or inf" in line and "[3, 5]" in line, line
    assert not list(out.parent.iterdir())

    tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}  # all-NaN: was a blank answer
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="requires finite values"):
        rdnac.compile(bad, output=out)


def _flip_byte_in(wpath, name) -> None:
    """Flip one byte inside tensor `name`'s data (same size, same header: only a checksum sees it)."""
    n = int.from_bytes(wpath.read_bytes()[:8], "little")
    begin, end = json.loads(wpath.read_bytes()[8:8 + n])[name]["data_offsets"]
    data = bytearray(wpath.read_bytes())
    data[8 + n + (begin + end) // 2] ^= 0x10
    wpath.write_bytes(bytes(data))


def test_a_changed_byte_is_caught_at_load_naming_the_tensor(plan, tmp_path):
    copy = _copy_plan(plan, tmp_path / "copy")
    wpath = copy.with_name("llama.weights.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    _flip_byte_in(wpath, name)
    with pytest.raises(PlanError) as e:
        rdnac.load(copy)  # on by default
    msg = str(e.value)
    assert f"tensor {name!r}" in msg and str(wpath) in msg and "xxh3_64" in msg and "\n" not in msg, msg
    rdnac.load(copy, verify_weights=False)  # asked not to check: loads (the same bytes, unchecked)

    line = _one_line_error(["run", copy, "--prompt", "hi", "--max-tokens", "2"])
    assert name in line and "llama.weights.safetensors" in line
    result = CliRunner().invoke(cli, ["run", str(copy), "--prompt", "hi", "--max-tokens", "2", "--no-verify-weights"])
    assert result.exit_code == 0, result.output


def test_a_plan_without_per_tensor_checksums_checks_the_whole_file(plan, tmp_path):
    """Format-2 plans written before the per-tensor record: the file's sha256 is checked instead."""
    copy = _copy_plan(plan, tmp_path / "copy")
    doc = msgpack.unpackb(copy.read_bytes(), raw=False)
    for key in ("tensors", "checksum"):
        del doc["header"]["weights"][key]
    copy.write_bytes(msgpack.packb(doc, use_bin_type=True))
    rdnac.load(copy)
    _flip_byte_in(copy.with_name("llama.weights.safetensors"), "lm_head.weight")
    with pytest.raises(PlanError, match="sha256 does not match"):
        rdnac.load(copy)


def test_serve_and_run_take_no_verify_weights():
    for command in ("run", "serve"):
        result = CliRunner().invoke(cli, [command, "--help"])
        assert "--no-verify-weights" in result.output, command


# ------------------------------------------------------------------ item 15: plans are data


def _sentinel(tmp_path):
    """A module that, if anything imported it, would leave a file behind."""
    (tmp_path / "evil_sentinel.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('yes')\n"
        "def system(*a, **k):\n    pass\n")
    return tmp_path / "IMPORTED"


@pytest.fixture(scope="module")
def gpu_plan(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_plan")
    make_checkpoint("qwen3", d / "ckpt")
    return rdnac.compile(d / "ckpt", target="gfx1201", output=d / "gfx1201.msgpack", quiet=True,
                         max_num_seqs=2, max_num_batched_tokens=16)


def _tampered(gpu_plan, directory, kernel: str | None, wrapper: str):
    """The plan with every binary's "module:function" set to `kernel` (None: left as they are) and every
    program step's wrapper to `wrapper`, its body hash recomputed: what an attacker who can edit the file can do."""
    out = _copy_plan(gpu_plan, directory)
    doc = msgpack.unpackb(out.read_bytes(), raw=False)
    body = msgpack.unpackb(doc["body"], raw=False, strict_map_key=False)
    for binary in body["kernels"] if kernel is not None else []:
        binary["kernel"] = binary["call"]["kernel"] = kernel
    for steps in body["program"].values():
        for choice in steps.values():
            choice["kernel"] = wrapper
    doc["body"] = msgpack.packb(body, use_bin_type=True)
    doc["body_sha256"] = __import__("hashlib").sha256(doc["body"]).hexdigest()
    out.write_bytes(msgpack.packb(doc, use_bin_type=True))
    return out


@pytest.mark.parametrize("kernel,wrapper", [("evil_sentinel:system", "evil_sentinel.system"),
                                            ("os:system", "os.system")])
def test_a_tampered_plan_is_refused_in_one_line_and_imports_nothing(gpu_plan, tmp_path, kernel, wrapper):
    marker = _sentinel(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", os.getcwd())]))
    # the binaries' names are checked first (runtime/kernel_check.py), then the program's wrappers
    for tampered_kernel, needles in ((kernel, (repr(kernel.partition(":")[0]), "kernel library")),
                                     (None, (wrapper, "register"))):
        bad = _tampered(gpu_plan, tmp_path / "plan", tampered_kernel, wrapper)
        done = subprocess.run([sys.executable, "-m", "rdnac.cli.main", "run", str(bad), "--interpret", "--prompt",
                               "hi", "--max-tokens", "1"], capture_output=True, text=True, env=env, timeout=300)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stdout + done.stderr
        assert all(needle in lines[0] for needle in needles), lines[0]
    bad = _tampered(gpu_plan, tmp_path / "plan", kernel, wrapper)
    # the binaries' names, which the GPU loader resolves (a stale check or a rebuild), likewise
    code = ("import sys\nfrom rdnac.plans import read_plan\nfrom rdnac.plans.binaries import KernelBinary\n"
            "from rdnac.runtime.aot import is_stale, rebuild\nfrom rdnac.errors import PlanError\n"
            f"plan = read_plan({str(bad)!r})\nd = plan.body['kernels'][0]\n"
            "for check in (lambda: is_stale(KernelBinary.from_dict(dict(d, triton_version=__import__('triton')"
            ".__version__))), lambda: rebuild(d)):\n"
            "    try:\n        check()\n    except PlanError as e:\n        print('refused:', e)\n"
            "    else:\n        print('accepted')\n"
            "print('imported' if 'evil_sentinel' in sys.modules else 'not imported')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[-1] == "not imported" and len(out) == 3, done.stdout
    assert all(line.startswith("refused: ") and "kernel library" in line for line in out[:2]), done.stdout
    assert not marker.exists()


@pytest.mark.parametrize("name", ["rdnac.kernels.gemm:linear", "rdnac.kernels.gemm:nonexistent"])
def test_a_library_name_that_is_no_kernel_is_a_plan_error(name):
    from rdnac.kernels.launch import resolve_kernel

    with pytest.raises(PlanError, match="@triton.jit kernel"):
        resolve_kernel(name)


@pytest.mark.gpu
def test_a_tampered_plan_is_refused_by_the_gpu_loader(tmp_path):
    make_checkpoint("qwen3", tmp_path / "ckpt")
    sm90 = rdnac.compile(tmp_path / "ckpt", target="sm90", output=tmp_path / "sm90.msgpack", quiet=True,
                         max_num_seqs=2, max_num_batched_tokens=16)
    bad = _tampered(sm90, tmp_path / "plan", "os:system", "gemm.linear")
    with pytest.raises(PlanError, match="kernel library"):
        rdnac.load(bad, device="cuda")
    assert "evil_sentinel" not in sys.modules
