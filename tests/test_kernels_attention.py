"""Paged attention kernels (prefill and split-K decode) against rdnac.ir.ops.attention."""

from __future__ import annotations

import pytest
import torch

from rdnac.ir import ops
from rdnac.kernels import attention as attn
from rdnac.kernels import attention_decode as attn_decode
from rdnac.kernels.gemm import split_k_counters
from rdnac.kernels.launch import InterpretLauncher, JitLauncher

BLOCK_SIZE = 16
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}  # (atol, rtol)

# (context length incl. new tokens, new tokens): block-boundary contexts, T in {1, 7, 33},
# full prefills and chunks after cached context.
PREFILL_SEQS = [(1, 1), (17, 7), (40, 33), (100, 33), (15, 15), (16, 7)]
DECODE_CONTEXTS = [1, 15, 16, 17, 40, 100]


def make_batch(seqs, num_heads, num_kv_heads, head_dim, dtype, *, num_padded=0, device="cpu", seed=0):
    """A paged batch with shuffled block tables. Block 0 is reserved and finite (padding reads it);
    every cache slot no sequence owns holds NaN, so reading past seq_len shows up in the output."""
    gen = torch.Generator().manual_seed(seed)
    ctx_lens = [c for c, _ in seqs] + [1] * num_padded
    q_lens = [n for _, n in seqs] + [1] * num_padded
    blocks_per_seq = [-(-c // BLOCK_SIZE) for c, _ in seqs]
    num_blocks = 1 + sum(blocks_per_seq) + 3
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    max_blocks = max(blocks_per_seq) + 2
    block_tables = torch.zeros(len(ctx_lens), max_blocks, dtype=torch.int32)
    cache_shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen)
    v_cache = torch.randn(cache_shape, generator=gen)
    owned = torch.zeros(num_blocks, BLOCK_SIZE, dtype=torch.bool)
    owned[0] = True
    for b, (ctx, _) in enumerate(seqs):
        for i in range(blocks_per_seq[b]):
            block_tables[b, i] = ids.pop()
            owned[block_tables[b, i], : min(BLOCK_SIZE, ctx - i * BLOCK_SIZE)] = True
    k_cache[~owned] = float("nan")
    v_cache[~owned] = float("nan")
    total = sum(q_lens)
    # q is a column slice of a wider qkv buffer: its row stride is not Hq*D.
    qkv = torch.randn(total, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    q = qkv[:, : num_heads * head_dim]
    positions = torch.cat([torch.arange(c - n, c) for c, n in zip(ctx_lens, q_lens)])
    positions[total - num_padded:] = 0
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    sinks = torch.randn(num_heads, generator=gen)
    batch = dict(q=q.to(dtype), k_cache=k_cache.to(dtype), v_cache=v_cache.to(dtype), block_tables=block_tables,
                 seq_lens=torch.tensor(ctx_lens, dtype=torch.int32), cu_seqlens_q=cu, positions=positions,
                 sinks=sinks.to(dtype))
    return {k: v.to(device) for k, v in batch.items()}, max(q_lens)


def check(phase, batch, max_query_len, attrs, config, launcher, *, use_sinks=False):
    args = [batch[k] for k in ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "cu_seqlens_q", "positions")]
    sinks = batch["sinks"] if use_sinks else None
    expected = ops.attention(*args, sinks, **attrs)
    if phase == "prefill":
        out = attn.attention_prefill(*args, sinks, **attrs, max_query_len=max_query_len, config=config,
                                     launcher=launcher)
    else:
        out = attn_decode.attention_decode(*args, sinks, **attrs, config=config, launcher=launcher)
    assert out.shape == expected.shape
    assert out.dtype == expected.dtype
    assert torch.isfinite(out).all(), "non-finite output"
    atol, rtol = TOLERANCES[out.dtype]
    err = (out.float() - expected.float()).abs().max().item()
    assert torch.allclose(out.float(), expected.float(), atol=atol, rtol=rtol), f"max abs error {err} ({config})"
    return out


def attrs_for(num_heads, num_kv_heads, head_dim, **extra):
    return dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=head_dim ** -0.5, **extra)


def problem(phase, num_heads, num_kv_heads, head_dim, **extra):
    return dict(phase=phase, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                block_size=BLOCK_SIZE, max_model_len=4096, dtype="bfloat16", **extra)


HEADS = [(2, 2), (3, 1), (8, 2), (8, 1)]  # GQA 1:1, 3:1, 4:1, 8:1


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
def test_prefill_matches_reference(num_heads, num_kv_heads, head_dim):
    batch, max_q = make_batch(PREFILL_SEQS, num_heads, num_kv_heads, head_dim, torch.float32)
    config = attn.default_config(problem("prefill", num_heads, num_kv_heads, head_dim))
    check("prefill", batch, max_q, attrs_for(num_heads, num_kv_heads, head_dim), config, InterpretLauncher())


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
def test_decode_matches_reference_with_padding(num_heads, num_kv_heads, head_dim):
    batch, _ = make_batch([(c, 1) for c in DECODE_CONTEXTS], num_heads, num_kv_heads, head_dim, torch.float32,
                          num_padded=2)
    config = attn.default_config(problem("decode", num_heads, num_kv_heads, head_dim))
    check("decode", batch, 1, attrs_for(num_heads, num_kv_heads, head_dim), config, InterpretLauncher())


OPTIONS = [dict(sliding_window=8), dict(sliding_window=20, softcap=3.0), dict(softcap=2.0), dict()]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("use_sinks", [False, True])
def test_prefill_window_softcap_sinks(options, use_sinks):
    batch, max_q = make_batch(PREFILL_SEQS, 6, 2, 64, torch.float32, seed=1)
    config = attn._config(4, 2, BLOCK_M=32, BLOCK_N=16)  # several key tiles so the window skips some
    check("prefill", batch, max_q, attrs_for(6, 2, 64, **options), config, InterpretLauncher(),
          use_sinks=use_sinks)


# Prompts longer than a key tile and no multiple of any (333 and 211 new tokens, the latter after 306
# cached ones: chunked prefill), one token after 129: every query tile runs several unmasked interior tiles.
LONG_SEQS = [(333, 333), (517, 211), (130, 1)]
WIDE_TILES = [(attn._config(8, 4, BLOCK_M=128, BLOCK_N=128), dict()),
              (attn._config(8, 3, BLOCK_M=128, BLOCK_N=64), dict(softcap=4.0)),
              (attn._config(4, 2, BLOCK_M=64, BLOCK_N=32), dict())]


@pytest.mark.parametrize("config,options", WIDE_TILES, ids=lambda c: "{BLOCK_M}x{BLOCK_N}".format(**c["constexprs"])
                         if "constexprs" in c else "softcap" if c else "plain")
def test_prefill_long_prompts_and_prefix_chunks(config, options):
    """Unowned cache slots hold NaN (make_batch): an unmasked tile reading past a sequence would show."""
    batch, max_q = make_batch(LONG_SEQS, 8, 2, 128, torch.float32, seed=11)
    check("prefill", batch, max_q, attrs_for(8, 2, 128, **options), config, InterpretLauncher(),
          use_sinks="softcap" in options)


@pytest.mark.parametrize("window", [40, 100, 1000])
@pytest.mark.parametrize("use_sinks", [False, True])
def test_prefill_window_wider_than_key_tiles(window, use_sinks):
    """A window spanning several key tiles: tiles at its lower edge (masked), whole tiles every row of the
    query tile sees (unmasked), the diagonal (masked); a window past the context hides nothing."""
    batch, max_q = make_batch([(300, 300), (260, 100), (77, 77)], 6, 2, 64, torch.float32, seed=12)
    check("prefill", batch, max_q, attrs_for(6, 2, 64, sliding_window=window), attn._config(4, 2, BLOCK_M=32, BLOCK_N=16),
          InterpretLauncher(), use_sinks=use_sinks)


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("use_sinks", [False, True])
def test_decode_window_softcap_sinks(options, use_sinks, num_splits):
    batch, _ = make_batch([(c, 1) for c in DECODE_CONTEXTS], 6, 2, 64, torch.float32, num_padded=1, seed=2)
    config = attn._config(4, 2, NUM_SPLITS=num_splits, BLOCK_N=16)
    check("decode", batch, 1, attrs_for(6, 2, 64, **options), config, InterpretLauncher(), use_sinks=use_sinks)


def _prefill_subset(space, default):
    """Default plus every (BLOCK_M, BLOCK_N) pair once: warps and stages do not change interpreted results."""
    seen, picked = set(), [default]
    for config in space:
        key = (config["constexprs"]["BLOCK_M"], config["constexprs"]["BLOCK_N"])
        if key not in seen:
            seen.add(key)
            picked.append(config)
    return picked


@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_config_space(head_dim):
    prob = problem("prefill", 4, 1, head_dim)
    space, default = attn.config_space(prob), attn.default_config(prob)
    assert default in space
    batch, max_q = make_batch(PREFILL_SEQS[1:4], 4, 1, head_dim, torch.float32, seed=3)
    launcher = InterpretLauncher()
    for config in _prefill_subset(space, default):
        check("prefill", batch, max_q, attrs_for(4, 1, head_dim, sliding_window=24), config, launcher, use_sinks=True)


def test_decode_config_space():
    prob = problem("decode", 4, 1, 128)
    space, default = attn.config_space(prob), attn.default_config(prob)
    assert default in space
    batch, _ = make_batch([(c, 1) for c in DECODE_CONTEXTS], 4, 1, 128, torch.float32, num_padded=1, seed=4)
    launcher = InterpretLauncher()
    # Every NUM_SPLITS once and every BLOCK_N once (plus the default): the two do not interact in-kernel.
    subset = [default] + [c for c in space if c["constexprs"]["BLOCK_N"] == 16 or c["constexprs"]["NUM_SPLITS"] == 4]
    for config in subset:
        check("decode", batch, 1, attrs_for(4, 1, 128), config, launcher)


def test_default_decode_splits_follow_batch_and_length():
    small = attn.default_config(problem("decode", 32, 8, 128, num_seqs=1))["constexprs"]["NUM_SPLITS"]
    big = attn.default_config(problem("decode", 32, 8, 128, num_seqs=256))["constexprs"]["NUM_SPLITS"]
    assert small > big >= 1


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_head_dim_80_and_bfloat16(phase):
    seqs = PREFILL_SEQS if phase == "prefill" else [(c, 1) for c in DECODE_CONTEXTS]
    launcher = InterpretLauncher()
    for head_dim, dtype in [(80, torch.float32), (128, torch.bfloat16), (64, torch.float16)]:
        batch, max_q = make_batch(seqs, 8, 2, head_dim, dtype, num_padded=int(phase == "decode"), seed=5)
        config = attn.default_config(problem(phase, 8, 2, head_dim))
        check(phase, batch, max_q, attrs_for(8, 2, head_dim, softcap=5.0), config, launcher, use_sinks=True)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_single_sequence(phase):
    """B = 1: one new token after 99 cached ones (T = 1), decode split over many mostly-empty splits."""
    batch, max_q = make_batch([(100, 1)], 4, 1, 64, torch.float32, seed=6)
    config = (attn._config(4, 2, BLOCK_M=16, BLOCK_N=32) if phase == "prefill"
              else attn._config(4, 2, NUM_SPLITS=16, BLOCK_N=16))
    check(phase, batch, max_q, attrs_for(4, 1, 64), config, InterpretLauncher(), use_sinks=True)


def _self_reducing(config: dict) -> dict:
    return {**config, "constexprs": {**config["constexprs"], "SELF_REDUCE": True}}


DECODE_ARGS = ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "cu_seqlens_q", "positions")


@pytest.mark.parametrize("num_heads,num_kv_heads,dtype", [(8, 2, torch.float32), (2, 2, torch.bfloat16)])
@pytest.mark.parametrize("use_sinks", [False, True])
def test_decode_self_reduce_is_bit_identical_to_the_reduce_kernel(num_heads, num_kv_heads, dtype, use_sinks):
    """SELF_REDUCE merges the splits with the reduce kernel's operations in its order: the same bits, and
    every arrival counter back at 0 (a second launch, or a graph replay, starts clean). The 9-key
    sequence fills less than one tile, so all its splits but the first are empty."""
    batch, _ = make_batch([(100, 1), (9, 1), (40, 1)], num_heads, num_kv_heads, 64, dtype, seed=9)
    attrs = attrs_for(num_heads, num_kv_heads, 64)
    launcher = InterpretLauncher()
    for num_splits in (2, 4, 16):
        for block_n in (16, 32):
            config = attn._config(4, 2, NUM_SPLITS=num_splits, BLOCK_N=block_n)
            two_launches = check("decode", batch, 1, attrs, config, launcher, use_sinks=use_sinks)
            for run in range(2):  # twice: the counters must have been reset
                one = check("decode", batch, 1, attrs, _self_reducing(config), launcher, use_sinks=use_sinks)
                assert torch.equal(one, two_launches), f"{config}: run {run} differs from the two-launch output"
            assert not split_k_counters(one.device, 1).any(), "arrival counters left non-zero"


def test_decode_self_reduce_launches_one_kernel_and_compiles_for_every_gpu_target():
    from rdnac.compiler.build import check_resources, compile_calls
    from rdnac.compiler.record import RecordingLauncher

    # Qwen3-8B widths at batch 1 (32/8 heads x 128), as `rdnac tune` records them
    batch, _ = make_batch([(1000, 1)], 32, 8, 128, torch.bfloat16, device="meta")
    args = [batch[k] for k in DECODE_ARGS]
    attrs = attrs_for(32, 8, 128)
    calls = []
    for num_splits, block_n, num_warps, use_sinks in ((16, 64, 8, False), (32, 16, 8, True), (4, 128, 2, False)):
        rec = RecordingLauncher()
        config = _self_reducing(attn._config(num_warps, 2, NUM_SPLITS=num_splits, BLOCK_N=block_n))
        attn_decode.attention_decode(*args, batch["sinks"] if use_sinks else None, **attrs, config=config, launcher=rec)
        assert [c.kernel.split(":")[1] for c in rec.calls] == ["_decode_kernel"]
        calls += rec.calls
    rec = RecordingLauncher()  # one split: nothing to merge, SELF_REDUCE is dropped
    attn_decode.attention_decode(*args, **attrs, config=_self_reducing(attn._config(4, 2, NUM_SPLITS=1, BLOCK_N=32)),
                          launcher=rec)
    assert [c.constexprs["SELF_REDUCE"] for c in rec.calls] == [False]
    # Every target builds them (a build error raises); on sm90, where `rdnac tune` offers them, none spills.
    for target in ("sm90", "gfx942", "gfx1201"):
        binaries = compile_calls(calls, target, quiet=True)
        if target == "sm90":
            assert all(check_resources(b, target) == [] for b in binaries)


class _RecordingLauncher:
    def __init__(self):
        self.launches = []

    def launch(self, kernel, grid, args, *, constexprs, num_warps=4, num_stages=2):
        self.launches.append((kernel.fn.__name__, grid))


def test_wrappers_run_on_meta_tensors_with_shape_only_grids():
    """No host reads of tensor values: the wrappers must record over meta tensors (and so capture in graphs)."""
    batch, _ = make_batch([(c, 1) for c in DECODE_CONTEXTS], 8, 2, 64, torch.float32, device="meta")
    rec = _RecordingLauncher()
    args = [batch[k] for k in ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "cu_seqlens_q", "positions")]
    attrs = attrs_for(8, 2, 64)
    out = attn_decode.attention_decode(*args, batch["sinks"], **attrs, config=attn._config(4, 2, NUM_SPLITS=8, BLOCK_N=32),
                                launcher=rec)
    attn.attention_prefill(*args, **attrs, max_query_len=1, config=attn._config(4, 2, BLOCK_M=16, BLOCK_N=16),
                           launcher=rec)
    assert out.shape == (6, 8 * 64) and out.device.type == "meta"
    assert rec.launches == [("_decode_kernel", (6, 2, 8)), ("_decode_reduce_kernel", (6, 8)),
                            ("_prefill_kernel", (6, 1, 2))]


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/HIP GPU")


@pytest.mark.gpu
@gpu
def test_gpu_bfloat16():
    """Every GQA shape with the default configs; the config spaces on one shape per head_dim (compiles are slow)."""
    launcher = JitLauncher()
    decode_seqs = [(c, 1) for c in DECODE_CONTEXTS]
    for head_dim in (64, 128):
        for num_heads, num_kv_heads in HEADS:
            sweep = (num_heads, num_kv_heads) == (8, 2)
            for options, use_sinks in [(dict(), False), (dict(sliding_window=20, softcap=3.0), True)]:
                attrs = attrs_for(num_heads, num_kv_heads, head_dim, **options)
                batch, max_q = make_batch(PREFILL_SEQS, num_heads, num_kv_heads, head_dim, torch.bfloat16,
                                          device="cuda")
                prob = problem("prefill", num_heads, num_kv_heads, head_dim)
                configs = attn.config_space(prob) if sweep and not use_sinks else [attn.default_config(prob)]
                for config in configs:
                    check("prefill", batch, max_q, attrs, config, launcher, use_sinks=use_sinks)
                batch, _ = make_batch(decode_seqs, num_heads, num_kv_heads, head_dim, torch.bfloat16,
                                      num_padded=2, device="cuda")
                prob = problem("decode", num_heads, num_kv_heads, head_dim)
                configs = attn.config_space(prob) if sweep and not use_sinks else [attn.default_config(prob)]
                for config in configs:
                    check("decode", batch, 1, attrs, config, launcher, use_sinks=use_sinks)


def _query_subset(batch: dict, rows_per_seq: int) -> torch.Tensor:
    """Indices of the first, middle and last `rows_per_seq` query tokens of every sequence."""
    cu = batch["cu_seqlens_q"].tolist()
    picked = []
    for start, end in zip(cu, cu[1:]):
        n = min(rows_per_seq, end - start)
        mid = (start + end - n) // 2
        picked += [torch.arange(start, start + n), torch.arange(mid, mid + n), torch.arange(end - n, end)]
    return torch.cat(picked).unique()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seqs", [[(2048, 2048)], [(16384, 16384)], [(16384, 8192), (3001, 1000)]],
                         ids=["2k", "16k", "16k-after-8k-prefix"])
def test_gpu_prefill_long_prompts_against_reference(seqs):
    """Qwen3-8B widths in bf16 on the device at 2k and 16k tokens, and an 8192-token chunk after 8192 cached
    ones batched with a 1000-token chunk of an odd length: the sm90 table's config, the cost model's pick, a
    128x64 tile and the default, each against the reference on the first, middle and last 64 query tokens of
    every sequence (the reference holds [heads, queries, keys] in float32: a subset keeps it small)."""
    from rdnac.compiler import cost_model, tuning
    from rdnac.targets import get_target

    launcher = JitLauncher()
    batch, max_q = make_batch(seqs, 32, 8, 128, torch.bfloat16, device="cuda", seed=13)
    attrs = attrs_for(32, 8, 128)
    prob = dict(problem("prefill", 32, 8, 128), num_seqs=len(seqs), num_tokens=batch["q"].shape[0])
    table = tuning.lookup("sm90", "attention", prob)
    configs = [table["config"]] if table else []
    configs += [cost_model.rank("attention", prob, attn.config_space(prob), get_target("sm90"))[0][0],
                attn._config(8, 3, BLOCK_M=128, BLOCK_N=64), attn.default_config(prob)]
    rows = _query_subset(batch, 64).cuda()
    sub = {**batch, "q": batch["q"][rows], "positions": batch["positions"][rows]}
    counts = torch.tensor([int(((rows >= a) & (rows < b)).sum()) for a, b in
                           zip(batch["cu_seqlens_q"].tolist(), batch["cu_seqlens_q"].tolist()[1:])])
    sub["cu_seqlens_q"] = torch.cat([torch.zeros(1), counts.cumsum(0)]).to(torch.int32).cuda()
    names = ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "cu_seqlens_q", "positions")
    expected = ops.attention(*[sub[k] for k in names], **attrs).float()
    for config in [c for i, c in enumerate(configs) if c not in configs[:i]]:
        out = attn.attention_prefill(*[batch[k] for k in names], **attrs, max_query_len=max_q, config=config,
                                     launcher=launcher)
        assert out.shape == batch["q"].shape and out.dtype == torch.bfloat16
        assert torch.isfinite(out).all(), f"non-finite output ({config})"
        err = (out[rows].float() - expected).abs().max().item()
        assert torch.allclose(out[rows].float(), expected, atol=2e-2, rtol=2e-2), f"max abs error {err} ({config})"


@pytest.mark.gpu
@gpu
def test_gpu_decode_graph_replays_for_new_seq_lens():
    """Capture decode once, then change the metadata in place: the replay must follow the new contexts."""
    launcher = JitLauncher()
    attrs = attrs_for(8, 2, 128)
    config = attn._config(4, 2, NUM_SPLITS=8, BLOCK_N=32)
    first, _ = make_batch([(c, 1) for c in (3, 17, 40, 100)], 8, 2, 128, torch.bfloat16, device="cuda", seed=7)
    second, _ = make_batch([(c, 1) for c in (90, 1, 33, 16)], 8, 2, 128, torch.bfloat16, device="cuda", seed=8)
    names = ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "cu_seqlens_q", "positions")
    static = {}  # buffers large enough for both batches, updated in place like the runtime's
    for name in names:
        shape = [max(a, b) for a, b in zip(first[name].shape, second[name].shape)]
        static[name] = torch.zeros(shape, dtype=first[name].dtype, device=first[name].device)

    def load(batch):
        for name in names:
            static[name].zero_()
            static[name][tuple(slice(0, n) for n in batch[name].shape)].copy_(batch[name])

    def run():
        return attn_decode.attention_decode(*[static[k] for k in names], **attrs, config=config, launcher=launcher)

    load(first)
    run()  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for batch in (first, second):
        load(batch)
        graph.replay()
        expected = ops.attention(*[static[k] for k in names], **attrs)
        err = (out.float() - expected.float()).abs().max().item()
        assert torch.allclose(out.float(), expected.float(), atol=2e-2, rtol=2e-2), f"max abs error {err}"


@pytest.mark.gpu
@gpu
def test_gpu_decode_self_reduce_bit_identical_in_a_replayed_graph():
    """Qwen3-8B widths: SELF_REDUCE equals the two-launch output bit for bit, eagerly and over 20 replays of
    a captured graph (a race between splits, or a counter left non-zero, would show as other bits)."""
    launcher = JitLauncher()
    attrs = attrs_for(32, 8, 128)
    batch, _ = make_batch([(1000, 1), (9, 1), (300, 1)], 32, 8, 128, torch.bfloat16, device="cuda", seed=10)
    args = [batch[k] for k in DECODE_ARGS]
    for num_splits, block_n, num_warps, use_sinks in ((2, 16, 8, False), (4, 64, 4, True), (16, 64, 8, False),
                                                      (16, 16, 2, True), (32, 16, 8, False)):
        config = attn._config(num_warps, 2, NUM_SPLITS=num_splits, BLOCK_N=block_n)
        sinks = batch["sinks"] if use_sinks else None
        expected = attn_decode.attention_decode(*args, sinks, **attrs, config=config, launcher=launcher)
        one = _self_reducing(config)
        eager = check("decode", batch, 1, attrs, one, launcher, use_sinks=use_sinks)
        assert torch.equal(eager, expected), f"{config}: differs from the two-launch output"
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attn_decode.attention_decode(*args, sinks, **attrs, config=one, launcher=launcher)
        for _ in range(20):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, expected), f"{config}: a replay differs from the two-launch output"
        assert not split_k_counters(out.device, 1).any(), "arrival counters left non-zero"


class _EarlyMeta:
    """The interpreter with EARLY_META=True added to every launch of a kernel that takes it (the plan's
    recorder adds it only with PDL, which the interpreter has no use for: this runs its loop structure)."""

    def __init__(self, inner=None) -> None:
        self.inner = inner or InterpretLauncher()
        self.kernels = []

    def launch(self, kernel, grid, args, *, constexprs, **kw):
        if any(p.name == "EARLY_META" for p in kernel.params):
            constexprs = {**constexprs, "EARLY_META": True}
            self.kernels.append(kernel.fn.__name__)
        self.inner.launch(kernel, grid, args, constexprs=constexprs, **kw)


@pytest.mark.parametrize("config", [attn._config(4, 2, NUM_SPLITS=1, BLOCK_N=16),
                                    attn._config(4, 2, NUM_SPLITS=4, BLOCK_N=16, SELF_REDUCE=True),
                                    attn._config(4, 2, NUM_SPLITS=2, BLOCK_N=32)])
@pytest.mark.parametrize("options", [dict(), dict(sliding_window=20)])
def test_decode_early_metadata_is_bit_identical(config, options):
    """EARLY_META reads each key tile's cache blocks one loop step ahead (the first before the PDL wait):
    several tiles per split, windows, padding rows; the same bits as the plain loop."""
    batch, _ = make_batch([(c, 1) for c in DECODE_CONTEXTS], 8, 2, 64, torch.float32, num_padded=1, seed=5)
    attrs = attrs_for(8, 2, 64, **options)
    early = _EarlyMeta()
    ours = check("decode", batch, 1, attrs, config, early)
    assert early.kernels and set(early.kernels) == {"_decode_kernel"}
    assert torch.equal(ours, check("decode", batch, 1, attrs, config, InterpretLauncher()))


@pytest.mark.parametrize("config", [attn._config(4, 2, NUM_SPLITS=1, BLOCK_N=16),
                                    attn._config(4, 2, NUM_SPLITS=4, BLOCK_N=16),
                                    attn._config(4, 2, NUM_SPLITS=4, BLOCK_N=16, SELF_REDUCE=True)])
@pytest.mark.parametrize("fmt", ["e4m3fn", "e4m3fnuz"])
def test_decode_quant_epilogue_is_the_unfused_pair(config, fmt):
    """attention_quant_decode writes the fp8 bytes and per-head scales that attention_decode followed by
    o_proj's quantization (group = head_dim) writes: no split, split with the reduce kernel, self-reduce."""
    from rdnac.kernels.fp8_quant import quantize_activations
    from tests.test_kernels_small import CPU  # casts round to nearest, as the GPU's do

    batch, _ = make_batch([(c, 1) for c in DECODE_CONTEXTS], 8, 2, 64, torch.bfloat16, num_padded=1, seed=6)
    args = [batch[k] for k in ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "cu_seqlens_q", "positions")]
    attrs = attrs_for(8, 2, 64)
    out = attn_decode.attention_decode(*args, **attrs, config=config, launcher=CPU)
    want_q, want_scale = quantize_activations(out, None, fmt, 64, launcher=CPU)
    got_q, got_scale = attn_decode.attention_quant_decode(*args, **attrs, fp8_format=fmt, group=64, config=config,
                                                   launcher=CPU)
    assert got_q.dtype == want_q.dtype and got_scale.shape == want_scale.shape == (len(DECODE_CONTEXTS) + 1, 8)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(got_scale, want_scale)
    early = _EarlyMeta(CPU)  # with the metadata loads moved ahead as well
    got_q, got_scale = attn_decode.attention_quant_decode(*args, **attrs, fp8_format=fmt, group=64, config=config,
                                                   launcher=early)
    assert early.kernels and torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(got_scale, want_scale)
    with pytest.raises(AssertionError, match="quantizes whole heads"):
        attn_decode.attention_quant_decode(*args, **attrs, fp8_format=fmt, group=128, config=config, launcher=CPU)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["gfx1201", "gfx1151", "gfx942", "gfx950"])
def test_prefill_head_dim_128_has_a_legal_config_on_every_amd_target(target):
    """Qwen3-8B widths (32/8 heads x 128) at a 2048-token prefill: among the cost model's first picks for the
    target, one builds within its LDS and spills nothing (what select_kernels walks; CI's plans are 32-64
    wide). The rejections are printed: on CDNA and RDNA4 64-key tiles spill at head_dim 128."""
    from rdnac.compiler import cost_model
    from rdnac.compiler.build import check_resources, compile_calls
    from rdnac.compiler.record import RecordingLauncher
    from rdnac.targets import get_target

    batch, _ = make_batch([(2048, 2048)], 32, 8, 128, torch.bfloat16, device="meta")
    prob = dict(problem("prefill", 32, 8, 128), num_seqs=1, num_tokens=2048)
    ranked = [c for c, est in cost_model.rank("attention", prob, attn.config_space(prob), get_target(target))
              if est.is_feasible][:4]
    calls = []
    for config in ranked:
        rec = RecordingLauncher()
        attn.attention_prefill(*[batch[k] for k in DECODE_ARGS], **attrs_for(32, 8, 128), max_query_len=2048,
                               config=config, launcher=rec)
        calls += rec.calls
    problems = [check_resources(b, target) for b in compile_calls(calls, target, quiet=True)]
    for config, found in zip(ranked, problems):
        print(f"{target} {config}: {'; '.join(found) or 'fits'}")
    assert any(not found for found in problems), f"{target}: none of the model's first {len(ranked)} picks fits"
