"""Tensor parallelism of MLA (DeepSeek V2/V3) and Gated DeltaNet (Qwen3.5) on cpu with gloo, against tp=1.

The reference is the tp=1 plan of the same checkpoint (checked against transformers in test_deepseek.py and
test_qwen3_5.py): logits within 1e-5 and the same greedy tokens with several requests in flight, and for
the hybrid Qwen3.5 model the same text served over HTTP to concurrent requests. Sizes: 4 MLA heads (2 per
rank) with an MoE of 8 experts of 14; Qwen3.5 with 2 GDN key heads serving 4 value heads (one key head and
two value heads per rank), gated full attention of 4 query heads over 2 KV heads; Qwen3-Next the same with its
fused GDN projections and a MoE with a gated shared expert (--tp and --ep).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.errors import UnsupportedModelError
from rdnac.plans import read_plan
from tests.support.checkpoints import make_checkpoint
from tests.test_tensor_parallel import ATOL, PROMPT, _check_sharded, _reference

MLA = dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=14)
DEEPSEEK = {"v2": ("deepseek_v2", dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                       routed_scaling_factor=1.5, **MLA)),
            "v3": ("deepseek_v3", dict(q_lora_rank=22, n_group=4, topk_group=2, norm_topk_prob=True,
                                       routed_scaling_factor=2.5, **MLA))}
QWEN3_5 = dict(hidden_size=44, intermediate_size=68, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=300, linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=12, linear_value_head_dim=10,
               layer_types=["linear_attention", "full_attention", "linear_attention"])


def _compile(ckpt, out, **options):
    return rdnac.compile(ckpt, target="cpu", output=out, quiet=True, **options)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    from tests.test_deepseek import make_deepseek

    built = {}

    def get(name: str):
        if name not in built:
            root = tmp_path_factory.mktemp(f"tp_{name}")
            model_type, overrides = DEEPSEEK[name]
            make_deepseek(root / "ckpt", model_type, **overrides)
            one = _compile(root / "ckpt", root / "tp1.msgpack")
            built[name] = root, _reference(one)
        return built[name]
    return get


@pytest.mark.parametrize("name", sorted(DEEPSEEK))
def test_mla_matches_one_rank(deepseek, name):
    """v2: no q LoRA (q_proj merged with kv_a_proj_with_mqa, whose rows stay whole); v3: q LoRA. Both with
    MoE layers (experts sliced), a shared expert and a dense first layer."""
    root, reference = deepseek(name)
    plan = _compile(root / "ckpt", root / "tp2.msgpack", tp=2)
    _check_sharded(plan, reference)


def test_mla_layout(deepseek):
    root, _ = deepseek("v2")
    plan = _compile(root / "ckpt", root / "layout.msgpack", tp=2)
    full, sharded = read_plan(root / "tp1.msgpack"), read_plan(plan)
    graph, ref, w1 = sharded.graph(), full.load_weights(), sharded.load_weights(rank=1)
    assert [s.shape for s in graph.state] == [s.shape for s in full.graph().state]  # the latent cache: whole
    attn = next(n for n in graph.nodes if n.op == "mla_attention")
    assert attn.attrs["num_heads"] == 2 and attn.attrs["decode_form"] == "absorbed"
    kv_b = "model.layers.0.self_attn.kv_b_proj.weight"  # [4 * (10 + 14), 18]: heads 2-3 on rank 1
    assert torch.equal(w1[kv_b], ref[kv_b][48:96])
    w_uk = "model.layers.0.self_attn.kv_b_proj.w_uk"
    assert torch.equal(w1[w_uk], ref[w_uk][2:4])
    merged = next(n for n in graph.nodes if n.op == "split" and n.name.startswith("layers.0.q"))
    assert merged.attrs["sizes"] == [2 * 16, 18 + 6]  # 2 query heads of 10 + 6; the kv_a rows whole
    # the embedding; each layer's o_proj; the dense first layer's MLP; the two MoE layers' routed experts and
    # shared expert, each reduced
    assert graph.op_counts()["all_reduce"] == 1 + 3 + 1 + 2 * 2


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_qwen3_5")
    make_checkpoint("qwen3_5_text", root / "ckpt", **QWEN3_5)
    one = _compile(root / "ckpt", root / "tp1.msgpack")
    two = _compile(root / "ckpt", root / "tp2.msgpack", tp=2)
    return root, one, two


def test_qwen3_5_matches_one_rank(qwen3_5):
    _, one, two = qwen3_5
    _check_sharded(two, _reference(one))


def test_qwen3_5_layout(qwen3_5):
    """Each rank's recurrent state holds its 2 value heads, its conv state the channels of its key head (q, k:
    12 each) and value heads (v: 20); A_log by value head; the full-attention layer's output gate by head."""
    _, one, two = qwen3_5
    full, sharded = read_plan(one), read_plan(two)
    graph, ref, w1 = sharded.graph(), full.load_weights(), sharded.load_weights(rank=1)
    shapes = {s.name: s.shape for s in graph.state}
    assert shapes["recurrent_state.0"] == (2, 12, 10) and shapes["conv_state.0"] == (12 + 12 + 20, 3)
    assert shapes["k_cache.1"] == (1, 16)
    a_log = "model.layers.0.linear_attn.A_log"
    assert torch.equal(w1[a_log], ref[a_log][2:4])
    conv = "model.layers.0.linear_attn.conv1d.weight"  # channels [q | k | v]: rank 1's key head 1, value heads 2-3
    want = torch.cat([ref[conv][12:24], ref[conv][36:48], ref[conv][48 + 20:48 + 40]])
    assert torch.equal(w1[conv], want)
    gdn = next(n for n in graph.nodes if n.op == "gated_delta_rule")
    assert (gdn.attrs["num_k_heads"], gdn.attrs["num_v_heads"]) == (1, 2)
    splits = {n.name: n.attrs["sizes"] for n in graph.nodes if n.op == "split" and n.name.startswith("layers.1.")}
    assert splits["layers.1.q_proj.split"] == [2 * 16, 2 * 16]  # the rank's 2 query heads, then their gates


def test_qwen3_5_served_to_concurrent_requests(qwen3_5):
    """`rdnac serve`'s app over a tp=2 plan (rank 1 a process of its own): four concurrent greedy completions
    give the text the tp=1 plan gives each alone."""
    import openai
    import uvicorn

    from rdnac.serve.app import create_app
    from rdnac.serve.worker import EngineWorker
    from tests.test_serve import _free_port, _wait_until

    _, one, two = qwen3_5
    reference = rdnac.load(one)
    prompts = ["Hello there", "abc", "The quick brown fox", "x"]
    expected = [reference.generate(p, SamplingParams(max_tokens=8))[0].text for p in prompts]
    served = rdnac.load(two)
    worker = EngineWorker(served.engine)
    worker.start()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(worker, served, model_name="tp2"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_until(lambda: server.started, 30, "uvicorn to start")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        ask = lambda p: client.completions.create(model="tp2", prompt=p, max_tokens=8,  # noqa: E731
                                                  temperature=0).choices[0].text
        started = time.monotonic()
        with ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(ask, prompts)) == expected
        assert time.monotonic() - started < 120
    finally:
        server.should_exit = True
        thread.join(10)
        worker.shutdown()
        served.close()


@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
def test_qwen3_next_matches_one_rank(tmp_path_factory, ep):
    """Qwen3-Next: GDN projections fused per key head in the checkpoint (regrouped, then sharded by head), a MoE
    with a gated shared expert (its [T, 1] sigmoid gate replicated), experts sliced or placed whole."""
    root = tmp_path_factory.getbasetemp() / "tp_qwen3_next"
    if not (root / "tp1.msgpack").exists():
        make_checkpoint("qwen3_next", root / "ckpt", **{**QWEN3_5, "num_experts": 4, "num_experts_per_tok": 2,
                                                        "moe_intermediate_size": 20,
                                                        "shared_expert_intermediate_size": 24,
                                                        "mlp_only_layers": [1], "norm_topk_prob": False})
        _compile(root / "ckpt", root / "tp1.msgpack")
    ref = rdnac.load(root / "tp1.msgpack").logits(PROMPT)
    llm = rdnac.load(_compile(root / "ckpt", root / f"tp2{'ep' if ep else ''}.msgpack", tp=2, ep=ep))
    try:
        err = (llm.logits(PROMPT) - ref).abs().max().item()
        assert err <= ATOL, f"max logits error {err:.3g}"
    finally:
        llm.close()


# ---------------------------------------------------------------- bad input, one line each


def test_heads_that_do_not_divide(deepseek, qwen3_5, tmp_path):
    root, _ = deepseek("v2")
    with pytest.raises(UnsupportedModelError, match=r"^--tp 3: node 'layers.0.attn' \(mla_attention\) has 4 query "
                                                    r"heads; --tp must divide them \(each rank attends with whole "
                                                    r"heads over the latent cache every rank holds\); choose a --tp "
                                                    r"that divides 4$"):
        _compile(root / "ckpt", tmp_path / "x.msgpack", tp=3)
    root, _, _ = qwen3_5
    with pytest.raises(UnsupportedModelError, match=r"^--tp 4: node 'layers.0.gdn' \(gated_delta_rule\) has 2 key "
                                                    r"heads \(each serving 2 value heads\); --tp must divide the key "
                                                    r"heads .*; choose a --tp that divides 2$"):
        _compile(root / "ckpt", tmp_path / "x.msgpack", tp=4)
    assert not list(tmp_path.glob("x.*"))

