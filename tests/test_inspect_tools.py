"""Plans you can read: `inspect --html`, `inspect --onnx`, `inspect --diff`, `verify` (and on a GPU).

Plans come from a tiny Qwen3 checkpoint written by transformers: compiled for
cpu with and without fusion, and cross-compiled for sm90 (no GPU needed).
"""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
import torch
from click.testing import CliRunner

import rdnac
from rdnac.cli.main import cli
from rdnac.cli.report import report_data
from rdnac.cli.verify import compare_values, run_plan, verify_plan
from rdnac.ir.graph import Graph
from rdnac.plans import read_plan, write_plan
from tests.support.checkpoints import make_checkpoint

TOKENS = "1,5,9,42,7,100,3,250"


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect_tools")
    make_checkpoint("qwen3", d / "ckpt")
    out = {"dir": d, "ckpt": d / "ckpt"}
    out["cpu"] = rdnac.compile(d / "ckpt", output=d / "fused.msgpack")
    out["cpu_unfused"] = rdnac.compile(d / "ckpt", output=d / "unfused.msgpack", disable_passes=("fuse_add_rms_norm",))
    out["sm90"] = rdnac.compile(d / "ckpt", target="sm90", output=d / "sm90.msgpack", quiet=True,
                                max_num_seqs=2, max_num_batched_tokens=16)
    return out


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


class _Page(HTMLParser):
    """Collects the text and checks that every non-void element is closed in order."""
    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.text, self.tags, self.errors = [], [], set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for key, value in attrs:
            if key in ("src", "href") and value and "://" in value:
                self.errors.append(f"external asset {value}")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(path) -> tuple[_Page, str]:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert not page.errors and not page.stack, (page.errors, page.stack)
    return page, " ".join(" ".join(page.text).split())


@pytest.mark.parametrize("which", ["cpu", "sm90"])
def test_html_report(plans, which):
    out = plans["dir"] / f"{which}.html"
    result = _invoke("inspect", plans[which], "--html", out)
    assert result.exit_code == 0, result.output
    page, text = _parse(out)
    assert {"html", "style", "table", "details"} <= page.tags and "script" not in page.tags
    graph = Graph.from_dict(read_plan(plans[which]).body["graph"])
    for node in graph.nodes:
        assert node.name in text, node.name
    assert text.count("fused") >= 4  # the four norms that absorbed an add are highlighted
    data = report_data(plans[which])
    assert data["memory"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * (4 if which == "cpu" else 2)
    if which == "cpu":
        assert "no bandwidth figure" in text and "interpreter (torch reference)" in text
        return
    for kernel in ("gemm.linear", "attention.attention_prefill", "attention_decode.attention_decode", "_gemm_kernel"):
        assert kernel in text, kernel
    rows = data["roofline"]["rows"]
    assert rows[0]["context"] == 1 and rows[-1]["context"] == data["memory"]["max_model_len"]
    for row in rows:  # bytes / 3350 GB/s, printed as TPOT and tokens/s
        assert row["tpot_ms"] == pytest.approx(row["bytes"] / 3350e9 * 1e3)
        assert f"{row['tokens_per_s']:.0f}" in text and f"{row['tpot_ms']:.4g}" in text


@pytest.mark.parametrize("which", ["cpu", "cpu_unfused", "sm90"])
def test_inspect_json_lists_the_declared_state(plans, which):
    result = _invoke("inspect", plans[which], "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    state, a = summary["state"], summary["model"]
    graph = Graph.from_dict(read_plan(plans[which]).body["graph"])
    assert [e["name"] for e in state["entries"]] == [s.name for s in graph.state]
    assert len(state["entries"]) == 2 * a["num_layers"]
    for e in state["entries"]:
        assert e["kind"] == "paged_kv" and e["per"] == "token" and e["shape"] == [a["num_kv_heads"], a["head_dim"]]
        assert e["dtype"] == a["dtype"] and e["name"] in graph.inputs
    per_token = 2 * a["num_layers"] * a["num_kv_heads"] * a["head_dim"] * getattr(torch, a["dtype"]).itemsize
    assert state["bytes_per_token"] == per_token and state["bytes_per_sequence"] == 0
    assert state["memory_bytes"] == 16 << 30 and state["sequence_slots"] == 0
    assert state["max_concurrent_tokens"] == ((16 << 30) - summary["weights"]["bytes"]) // per_token


def test_onnx_export(plans):
    import onnx

    for which in ("cpu", "sm90"):
        out = plans["dir"] / f"{which}.onnx"
        result = _invoke("inspect", plans[which], "--onnx", out)
        assert result.exit_code == 0, result.output
        model = onnx.load(str(out))
        onnx.checker.check_model(model, full_check=True)
        plan = read_plan(plans[which])
        graph = Graph.from_dict(plan.body["graph"])
        assert [n.name for n in model.graph.node] == [n.name for n in graph.nodes]
        assert [n.op_type for n in model.graph.node] == [n.op for n in graph.nodes]
        assert {n.domain for n in model.graph.node} == {"ai.rdnac"}
        assert "ai.rdnac" in {o.domain for o in model.opset_import}
        assert len(model.graph.initializer) == 0 and len(model.graph.sparse_initializer) == 0  # no weight data
        assert {i.name for i in model.graph.input} == set(graph.inputs) | set(graph.weights)
        token_ids = next(i for i in model.graph.input if i.name == "token_ids")
        assert token_ids.type.tensor_type.shape.dim[0].dim_param == "T"
        (logits,) = model.graph.output
        assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["R", 300]
        attn = next(n for n in model.graph.node if n.op_type == "attention")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in attn.attribute}
        assert attrs["num_heads"] == 6 and attrs["scale"] == pytest.approx(0.25)
        assert attn.input[1] == "k_cache.0.written"  # the in-place cache write shows as an edge


def test_diff_fusion_on_vs_off(plans):
    result = _invoke("inspect", "--diff", plans["cpu_unfused"], plans["cpu"], "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["header"]["compile_options.disable_passes"] == [["fuse_add_rms_norm"], []]
    assert d["ops"] == {"add": [4, 0]}
    removed = {e["node"] for e in d["nodes"]["removed"]}
    assert removed == {f"layers.{i}.{r}_residual" for i in (0, 1) for r in ("attn", "mlp")}
    assert {e["op"] for e in d["nodes"]["removed"]} == {"add"} and not d["nodes"]["added"]
    changed = {e["node"]: e for e in d["nodes"]["changed"]}
    assert set(changed) == {"layers.0.post_norm", "layers.1.input_norm", "layers.1.post_norm", "final_norm"}
    assert changed["final_norm"]["outputs"] == [["final_norm"], ["final_norm", "layers.1.mlp_residual"]]
    assert len(d["decisions"]["only_b"]) == 4 and d["decisions"]["only_a"][0]["action"] == "skipped"
    assert not d["weights"]["changed"] and not d["kernels"] and not d["identical"]

    text = _invoke("inspect", "--diff", plans["cpu_unfused"], plans["cpu"])
    assert text.exit_code == 0 and "layers.1.mlp_residual" in text.output and "removed" in text.output
    same = _invoke("inspect", "--diff", plans["cpu"], plans["cpu"], "--json")
    assert json.loads(same.stdout)["identical"]


def test_diff_targets_and_kernel_choices(plans, tmp_path):
    d = json.loads(_invoke("inspect", "--diff", plans["cpu"], plans["sm90"], "--json").stdout)
    assert d["header"]["target"] == ["cpu", "sm90"] and d["has_program"] == [False, True]
    assert {e["dtype"][1] for e in d["weights"]["changed"]} == {"bfloat16"}

    plan = read_plan(plans["sm90"])  # the same plan with one node's decode config changed
    choice = plan.body["program"]["layers.1.o_proj"]["decode:1"]
    choice["config"] = dict(choice["config"], num_warps=8)
    other = write_plan(tmp_path / "other.msgpack", plan.header, plan.body, plan.load_weights())
    d = json.loads(_invoke("inspect", "--diff", plans["sm90"], other, "--json").stdout)
    assert [(e["node"], e["step"]) for e in d["kernels"]] == [("layers.1.o_proj", "decode:1")]
    assert d["kernels"][0]["b"]["config"]["num_warps"] == 8


def test_verify_honest_plans(plans):
    for which in ("cpu", "cpu_unfused"):
        result = _invoke("verify", plans[which], "--against", plans["ckpt"], "--token-ids", TOKENS)
        assert result.exit_code == 0, result.output
        assert "ok: all" in result.output
    # bf16 kernels under the Triton interpreter against the float32 reference
    result = verify_plan(plans["sm90"], plans["ckpt"], token_ids=[1, 5, 9, 42, 7], interpret=True)
    assert result.runner == "triton-interpreter" and result.is_ok, max(r.error for r in result.rows)
    assert result.rows[-1].value == "logits" and result.rows[-1].error < 0.05


@pytest.mark.gpu
def test_verify_runs_an_sm90_plan_on_the_gpu(plans):
    """The plan's binaries on the GPU, looked up with the plan's launch flags (PDL on sm90)."""
    result = verify_plan(plans["sm90"], plans["ckpt"], token_ids=[1, 5, 9, 42, 7])
    assert result.runner == "cuda" and result.is_ok, max(r.error for r in result.rows)
    assert result.rows[-1].value == "logits" and result.rows[-1].error < 0.05


def test_verify_names_the_corrupted_node(plans, tmp_path):
    plan = read_plan(plans["cpu"])
    weights = plan.load_weights()
    weights["model.layers.1.self_attn.qkv_proj.weight"][-32:] *= 1.5  # v rows (2 kv heads x 16) of the merged qkv
    bad = write_plan(tmp_path / "bad.msgpack", plan.header, plan.body, weights)  # sidecar size and sha256 rewritten
    result = _invoke("verify", bad, "--against", plans["ckpt"], "--prompt", "Hello there")
    assert result.exit_code == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    # merge_linears made q/k/v one GEMM; the split node that yields v_proj is the first value over tolerance
    assert len(error_lines) == 1 and "layers.1.qkv_proj.split (split) is the first node over tolerance: " \
        "layers.1.v_proj error 0.5" in error_lines[0]

    checks = verify_plan(bad, plans["ckpt"], token_ids=[1, 2, 3]).rows
    first = next(i for i, r in enumerate(checks) if not r.is_ok)
    assert checks[first].node == "layers.1.qkv_proj.split" and checks[first].value == "layers.1.v_proj"
    assert all(r.is_ok for r in checks[:first])
    assert checks[first].error == pytest.approx(0.5, rel=1e-4)  # |1.5 x - x| / max|x|


def test_compare_values_flags_nan_and_shape(plans):
    plan = read_plan(plans["cpu"])
    graph = Graph.from_dict(plan.body["graph"])
    values, runner = run_plan(plan, plan.load_weights(), [4, 5, 6])
    assert runner == "interpreter"
    reference = {k: v.clone() for k, v in values.items()}
    assert all(r.is_ok and r.error == 0 for r in compare_values(graph, values, reference, 1e-6))
    # layers.0.rope.0 is q' of the fused q/k-norm + rope + cache-write node (the norms' own values are gone)
    values["layers.0.rope.0"] = values["layers.0.rope.0"].clone()
    values["layers.0.rope.0"][0, 0] = float("nan")
    values["layers.1.act"] = values["layers.1.act"][:2]
    rows = {r.value: r for r in compare_values(graph, values, reference, 1e-6)}
    assert not rows["layers.0.rope.0"].is_ok and rows["layers.0.rope.0"].max_abs_error == float("inf")
    assert not rows["layers.1.act"].is_ok and "shape" in rows["layers.1.act"].note
    assert rows["layers.0.qkv_proj"].is_ok


def test_inspect_usage_errors(plans):
    assert _invoke("inspect").exit_code == 2
    assert _invoke("inspect", plans["cpu"], "--diff", plans["cpu"], plans["cpu"]).exit_code == 2
    assert _invoke("verify", plans["cpu"], "--against", plans["ckpt"], "--token-ids", "1,x").exit_code == 2
    result = _invoke("verify", plans["cpu"], "--against", plans["ckpt"], "--token-ids", "1,100000")
    assert result.exit_code == 1 and "0 <= id < 300" in result.output
    assert torch.is_tensor(read_plan(plans["cpu"]).load_weights()["lm_head.weight"])
