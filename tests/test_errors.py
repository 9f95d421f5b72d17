"""Bad input gets one clear line naming what is wrong, never a traceback."""

from __future__ import annotations

import json
import shutil

import msgpack
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from rdnac.cli.main import cli
from tests.support.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "llama"
    make_checkpoint("llama", directory)
    return directory


@pytest.fixture(scope="module")
def plan(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "llama.msgpack"
    result = CliRunner().invoke(cli, ["compile", str(checkpoint), "--target", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _variant(checkpoint, tmp_path):
    target = tmp_path / "variant"
    shutil.copytree(checkpoint, target)
    return target


def _one_line_error(args) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_unknown_architecture_lists_supported(checkpoint, tmp_path):
    d = _variant(checkpoint, tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (d / "config.json").write_text(json.dumps(config))
    line = _one_line_error(["compile", str(d), "-o", str(tmp_path / "p.msgpack")])
    assert "FalconForCausalLM" in line and "LlamaForCausalLM" in line and "Qwen3ForCausalLM" in line


def test_missing_tensor_is_named(checkpoint, tmp_path):
    d = _variant(checkpoint, tmp_path)
    _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    line = _one_line_error(["compile", str(d), "-o", str(tmp_path / "p.msgpack")])
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in line


def test_unused_tensor_is_named(checkpoint, tmp_path):
    d = _variant(checkpoint, tmp_path)
    _edit_tensors(d, lambda t: t.update({"model.layers.0.extra.weight": t["model.norm.weight"].clone()}))
    line = _one_line_error(["compile", str(d), "-o", str(tmp_path / "p.msgpack")])
    assert "not used" in line and "model.layers.0.extra.weight" in line


def test_shape_mismatch_is_named(checkpoint, tmp_path):
    d = _variant(checkpoint, tmp_path)
    _edit_tensors(d, lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:-1].clone()}))
    line = _one_line_error(["compile", str(d), "-o", str(tmp_path / "p.msgpack")])
    assert "model.norm.weight" in line and "[72]" in line and "[71]" in line


def test_truncated_safetensors(checkpoint, tmp_path):
    d = _variant(checkpoint, tmp_path)
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    line = _one_line_error(["compile", str(d), "-o", str(tmp_path / "p.msgpack")])
    assert "truncated" in line and "model.safetensors" in line


def test_truncated_plan(plan, tmp_path):
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(plan.read_bytes()[:5000])
    assert "truncated or corrupt" in _one_line_error(["inspect", str(bad)])


def test_corrupt_plan_body(plan, tmp_path):
    doc = msgpack.unpackb(plan.read_bytes(), raw=False)
    body = bytearray(doc["body"])
    body[len(body) // 2] ^= 0xFF
    doc["body"] = bytes(body)
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(msgpack.packb(doc, use_bin_type=True))
    assert "corrupt" in _one_line_error(["inspect", str(bad)])


def test_plan_format_version_mismatch(plan, tmp_path):
    doc = msgpack.unpackb(plan.read_bytes(), raw=False)
    doc["format_version"] = 99
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(msgpack.packb(doc, use_bin_type=True))
    line = _one_line_error(["inspect", str(bad)])
    assert "format version 99" in line and "recompile" in line


def _rewritten_plan(plan, tmp_path, edit_doc=None, edit_body=None):
    """A copy of `plan` (weights alongside) with its document or body edited; the body hash is kept valid."""
    import hashlib

    doc = msgpack.unpackb(plan.read_bytes(), raw=False)
    if edit_body is not None:
        body = msgpack.unpackb(doc["body"], raw=False, strict_map_key=False)
        edit_body(body)
        doc["body"] = msgpack.packb(body, use_bin_type=True)
        doc["body_sha256"] = hashlib.sha256(doc["body"]).hexdigest()
    if edit_doc is not None:
        edit_doc(doc)
    out = tmp_path / plan.name
    out.write_bytes(msgpack.packb(doc, use_bin_type=True))
    shutil.copy(plan.with_name(doc["header"]["weights"]["file"]), tmp_path)
    return out


def test_plan_from_before_declared_state_is_refused(plan, tmp_path):
    """A version-1 plan (K/V caches as bare graph inputs, no declared state) asks to be recompiled."""
    def old(body):
        del body["graph"]["state"]

    bad = _rewritten_plan(plan, tmp_path, edit_doc=lambda doc: doc.update(format_version=1), edit_body=old)
    line = _one_line_error(["run", str(bad), "--prompt", "hi"])
    assert "format version 1" in line and "recompile" in line


def test_unknown_state_kind_is_refused_at_load_naming_it(plan, tmp_path):
    def unknown(body):
        body["graph"]["state"][3]["kind"] = "paged_hologram"

    bad = _rewritten_plan(plan, tmp_path, edit_body=unknown)
    for args in (["run", str(bad), "--prompt", "hi"], ["inspect", str(bad)]):
        line = _one_line_error(args)
        assert "'paged_hologram'" in line and "recompile" in line and str(bad) in line, line


def test_weights_file_mismatch(plan, tmp_path):
    work = tmp_path / "copy"
    work.mkdir()
    for f in plan.parent.iterdir():
        shutil.copy(f, work / f.name)
    weights = work / "llama.weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    line = _one_line_error(["run", str(work / "llama.msgpack"), "--prompt", "hi", "--max-tokens", "2",
                            "--verify-weights"])
    assert "xxh3_64 checksum" in line and "llama.weights.safetensors" in line and "tensor '" in line
    weights.write_bytes(bytes(data[:-100]))
    assert "size" in _one_line_error(["run", str(work / "llama.msgpack"), "--prompt", "hi"])


def test_prompt_longer_than_max_model_len(plan):
    line = _one_line_error(["run", str(plan), "--prompt", "word " * 300, "--max-tokens", "2"])
    assert "max model length 256" in line


def test_not_a_checkpoint(tmp_path):
    assert "config.json" in _one_line_error(["compile", str(tmp_path), "-o", str(tmp_path / "p.msgpack")])


def test_weights_checked_at_load_and_hashed_on_request(plan, tmp_path):
    """Load checks size and tensor specs, and (verify_weights, on by default) each tensor's checksum."""
    import rdnac
    from rdnac.errors import PlanError

    copy = tmp_path / "llama.msgpack"
    shutil.copy(plan, copy)
    wpath = tmp_path / "llama.weights.safetensors"
    shutil.copy(plan.with_name("llama.weights.safetensors"), wpath)
    data = bytearray(wpath.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data
    wpath.write_bytes(bytes(data))
    rdnac.load(copy, verify_weights=False)  # same size, same tensors, bytes unchecked: loads
    for options in ({}, {"verify_weights": True}):
        with pytest.raises(PlanError, match="requires the xxh3_64 checksum"):
            rdnac.load(copy, **options)
    tensors = load_file(str(plan.with_name("llama.weights.safetensors")))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name][:1].clone()
    save_file(tensors, str(wpath))
    doc = msgpack.unpackb(copy.read_bytes(), raw=False)
    doc["header"]["weights"]["size"] = wpath.stat().st_size  # pass the size check: reach the spec check
    copy.write_bytes(msgpack.packb(doc, use_bin_type=True))
    with pytest.raises(PlanError, match=f"tensor {name!r} is"):
        rdnac.load(copy)



def test_unknown_disable_pass_names_the_passes(checkpoint, tmp_path):
    """A misspelt --disable-pass must not compile a plan with every pass on."""
    out = tmp_path / "x.msgpack"
    line = _one_line_error(["compile", str(checkpoint), "--target", "cpu", "-o", str(out),
                            "--disable-pass", "fuse_gated_linaer"])
    assert "no pass named 'fuse_gated_linaer'; the passes are" in line and "fuse_gated_linear" in line, line
    assert not out.exists()
