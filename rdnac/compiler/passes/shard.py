"""Shard a plan over `--tp N` ranks (tensor parallelism; `--ep`: experts placed whole per rank).

Runs last among the graph passes (after fusion), when --tp > 1. The result
is one graph that every rank runs, with per-rank weights
(`state.rank_weights`, rank 0's being `state.weights`); each rank's weights
become a sidecar of their own so a rank reads only its own bytes.

- Attention: q/k/v (merged qkv rows, or the separate linears) are
  column-parallel by head: rank r keeps its Hq/N query heads and the KV heads
  they read; each rank's slice of a merged qkv is [its q rows, its k rows,
  its v rows], contiguous. With fewer KV heads than ranks (N a multiple of
  Hk), each rank keeps the one KV head its query heads use (replicated over
  the N/Hk ranks that share it). Head counts of rope / q-k norm / cache
  write / attention nodes and the declared KV state shrink to the rank's.
  o_proj is row-parallel (its input columns of the rank's heads), followed
  by an `all_reduce`; a bias is added on rank 0 only.
- Gated MLP: gate/up (merged [gate; up] rows or two linears) column-parallel
  by blocks of I/N, down_proj row-parallel + `all_reduce`.
- MoE, --tp: every expert's gate/up and down sliced as the MLP's (I/N each;
  FP8 block experts with their 128x128 scale blocks, I/N a multiple of 128);
  --ep: rank r holds experts [r*E/N, (r+1)*E/N) whole, a `shard_ids` node maps
  the routed ids to its experts (-1 for the others, which it skips). Routing
  runs on every rank (the router is replicated), then each rank's partial
  sum is `all_reduce`d (the default, `--ep-dispatch all-reduce`). With
  `--ep-dispatch all-to-all` each rank routes its own slice of the tokens
  and sends their (token, expert) slots to the experts' ranks instead
  (reduce_scatter, all_to_all, all_gather_rows: shard_dispatch.py, which
  also says why all-reduce stays the default).
- Embedding: vocabulary-parallel, V padded to a multiple of N with zero rows:
  `shard_ids` + masked lookup + `all_reduce`. lm_head (`logits`): the same
  rows, then `all_gather` of the logits columns (the padding dropped).
- The experts' slices and placement: shard_experts.py. MLA and Gated DeltaNet heads: shard_mixers.py. FP8 / INT8 linears: their
  weight scales with their weights, and which activation scales stay exact
  after the split: shard_quantized.py. Gated attention's output
  gate (Qwen3.5, Qwen3-Next) is split by query head with the query.
Everything else (norms, routers, residual adds, a shared expert's per-token
gate) is replicated.

Column-parallel slices are requested on the values the sharded nodes read
(`want_columns`) and resolved backwards to the weights that make them
(`resolve_columns`): through a merged linear's split (each part its own way,
or whole: a replicated projection merged with sharded ones keeps its rows on
every rank), and through a causal conv's channels. On GPU targets the
collectives become torch.distributed calls (rdnac/kernels/collective.py).

Refused, one line each: a --tp that does not divide the query heads, the KV
heads (or is not a multiple of them), the MLA heads, the GDN key heads, the
intermediate size or the experts (--ep); a block-scaled weight whose
slices do not fall on its scale blocks (FP8 block experts' too).
"""

from __future__ import annotations

import math

import torch

from rdnac.compiler.passes import CompileState
from rdnac.compiler.passes import shard_dispatch as dispatch
from rdnac.compiler.passes import shard_experts
from rdnac.compiler.passes import shard_mixers as mixers
from rdnac.compiler.passes import shard_quantized as q8
from rdnac.errors import UnsupportedModelError
from rdnac.ir.graph import Node, TensorSpec, WeightSpec
from rdnac.ir.ops import ATTENTION_OPS, OPS
from rdnac.ir.state import StateSpec

NAME = "shard"
VOCAB_START = "tp.vocab_start"  # per-rank int64 [1] weight (the experts' EXPERT_START: shard_experts.py)
EXPERT_START = shard_experts.EXPERT_START


def run(state: CompileState) -> None:
    num_ranks = state.options.tp
    if num_ranks == 1:
        return
    Sharder(state, num_ranks, state.options.ep).run()


class Sharder:
    def __init__(self, state: CompileState, num_ranks: int, ep: bool):
        self.state, self.graph, self.n, self.ep = state, state.graph, num_ranks, ep
        self.full = state.weights  # the unsharded tensors
        self.ranks: list[dict[str, torch.Tensor]] = [dict(state.weights) for _ in range(num_ranks)]
        self.how: dict[str, str] = {}  # weight -> how it was sharded (a tied weight is sharded once)
        self.producer: dict[str, tuple[Node, int]] = {}
        self.readers: dict[str, list[Node]] = {}
        self.after: dict[str, list[Node]] = {}  # node name -> nodes to insert after it
        # value -> (rank -> the value's columns that rank keeps, how): resolved back to the weights that make
        # the value once every consumer has asked (`resolve_columns`), so a merged linear's parts are sharded
        # each its own way (or kept whole) in one slice per rank
        self.columns: dict[str, tuple] = {}

    def fail(self, node: Node, why: str) -> None:
        raise UnsupportedModelError(f"--tp {self.n}{' --ep' if self.ep else ''}: node {node.name!r} ({node.op}) "
                                    f"{why}")

    def run(self) -> None:
        g = self.graph
        for node in g.nodes:
            for i, out in enumerate(node.outputs):
                self.producer[out] = (node, i)
            for name in node.inputs:
                self.readers.setdefault(name, []).append(node)
        for node in list(g.nodes):
            if node.op in ATTENTION_OPS:
                self.attention(node)
            elif node.op in ("linear_gated_act", "gated_act", "gated_act_quant", "gated_act_linear_fp8"):
                self.mlp(node)
            elif node.op in ("moe_experts", "moe_experts_mxfp4", "moe_experts_fp8_block"):
                self.experts(node)
            elif node.op == "embedding":
                self.embedding(node)
            elif node.op == "logits":
                self.logits(node)
            elif node.op == "mla_attention":
                mixers.mla(self, node)
            elif node.op == "gated_delta_rule":
                mixers.gated_delta_rule(self, node)
        self.resolve_columns()
        g.nodes = [m for n in g.nodes for m in (n, *self.after.get(n.name, []))]
        if self.state.options.ep_dispatch == "all-to-all":
            dispatch.all_to_all_form(self)
        g.attrs["mesh"] = {"tp": self.n, "ep": self.ep, "ep_dispatch": self.state.options.ep_dispatch if self.ep
                           else None}
        self.state.weights = self.ranks[0]
        self.state.rank_weights = self.ranks
        replicated = [k for k in self.full if k not in self.how]
        self.state.decide(NAME, "-", f"{self.n} ranks: {len(self.how)} weights sharded, {len(replicated)} "
                          "replicated", "norms, routers and other small weights are the same on every rank")

    # ------------------------------------------------------------ weights

    def shard(self, name: str, how: str, pick) -> None:
        """Rank r's `name` = pick(full tensor, r); the spec takes rank 0's shape (every rank's is the same)."""
        if name in self.how:
            assert self.how[name] == how, f"{name} sharded two ways: {self.how[name]} and {how}"
            return
        self.how[name] = how
        full = self.full[name]
        for r in range(self.n):
            self.ranks[r][name] = pick(full, r).contiguous()
        spec = self.graph.weights[name]
        self.graph.weights[name] = WeightSpec(spec.dtype, tuple(self.ranks[0][name].shape), spec.scheme, spec.source)

    def rows(self, name: str, how: str, index) -> None:
        self.shard(name, how, lambda t, r: t.index_select(0, torch.tensor(index(r), dtype=torch.long)))

    def rank0_only(self, name: str) -> None:
        """A row-parallel layer's bias: added once (rank 0) to the sum."""
        self.shard(name, "rank 0 only", lambda t, r: t if r == 0 else torch.zeros_like(t))

    def per_rank_start(self, name: str, step: int) -> None:
        if name not in self.graph.weights:
            self.graph.weights[name] = WeightSpec("int64", (1,), source=f"rank * {step}")
            for r in range(self.n):
                self.ranks[r][name] = torch.tensor([r * step], dtype=torch.int64)
            self.how[name] = "per rank"

    def reduce_after(self, node: Node, index: int = 0) -> None:
        """all_reduce node's output `index`: the node writes `<out>.partial`, the sum keeps the name."""
        out = node.outputs[index]
        node.outputs[index] = f"{out}.partial"
        self.after.setdefault(node.name, []).append(Node(f"{node.name}.all_reduce", "all_reduce",
                                                         [f"{out}.partial"], [out]))

    def single_linear_reader(self, value: str, node: Node) -> Node:
        readers = self.readers.get(value, [])
        if len(readers) != 1 or readers[0].op not in q8.LINEARS or readers[0].inputs[0] != value:
            self.fail(node, f"requires its output to feed one row-parallel linear; it feeds "
                            f"{[f'{r.name} ({r.op})' for r in readers]}")
        return readers[0]

    def row_parallel(self, linear: Node, cols) -> None:
        """linear's input columns of rank r (`cols(r)`, a slice), its bias on rank 0, then an all_reduce; an
        8-bit linear's scales with them (shard_quantized.py)."""
        weight, _, bias = q8.weight_inputs(linear)
        self.shard(weight, "row-parallel", lambda t, r: t[:, cols(r)])
        q8.row_parallel_scales(self, linear, cols)
        if bias:
            self.rank0_only(bias)
        self.reduce_after(linear)

    def column_parallel(self, linear: Node, how: str, index) -> None:
        """linear's output rows of rank r (`index(r)`): weight, bias and an 8-bit weight's scale rows."""
        weight, _, bias = q8.weight_inputs(linear)
        q8.column_parallel_scales(self, linear, how, index)
        for w in (weight, bias):
            if w:
                self.rows(w, how, index)

    # ------------------------------------------------------------ attention

    def attention(self, node: Node) -> None:
        a, n = node.attrs, self.n
        hq, hk, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
        if hq % n:
            self.fail(node, f"has {hq} query heads; --tp must divide them (each rank computes whole heads); "
                            f"choose a --tp that divides {hq}")
        if hk % n and n % hk:
            self.fail(node, f"has {hk} KV heads; --tp must divide them, or be a multiple of them (each rank then "
                            f"keeps the one KV head its query heads read); choose such a --tp")
        hq_l, hk_l, group = hq // n, max(1, hk // n), hq // hk
        q_heads = lambda r: range(r * hq_l, (r + 1) * hq_l)  # noqa: E731
        kv_heads = (lambda r: range(r * hk_l, (r + 1) * hk_l)) if hk >= n else (lambda r: [r * hq_l // group])
        writer = next((w for w in self.graph.nodes if node.inputs[1] in [w.inputs[i] for i in OPS[w.op].in_place]),
                      None)
        if writer is None or writer.op not in ("kv_cache_write", "qk_norm_rope_cache"):
            self.fail(node, "requires its caches written by kv_cache_write or qk_norm_rope_cache")
        k_in, v_in = (writer.inputs[0], writer.inputs[1]) if writer.op == "kv_cache_write" else writer.inputs[1:3]
        heads = {"q": q_heads, "k": kv_heads, "v": kv_heads}
        for part, value in (("q", node.inputs[0]), ("k", k_in), ("v", v_in)):
            value, chain = self.trace(value, node)
            for c in chain:
                self.heads_attrs(c, part, hq_l, hk_l)
            self.want_columns(value, self.head_columns(heads[part], d), f"column-parallel by {part} head", node)
        self.heads_attrs(writer, "kv", hq_l, hk_l)
        self.heads_attrs(node, "kv", hq_l, hk_l)
        if len(node.inputs) == 8:  # sinks [Hq]
            self.rows(node.inputs[7], "by query head", lambda r: list(q_heads(r)))
        for cache in node.inputs[1:3]:
            self.local_state(cache, (hk_l, d))
        out = node.outputs[0]
        gate = self.readers.get(out, [])
        if len(gate) == 1 and gate[0].op in ("sigmoid_gate", "sigmoid_gate_quant") and gate[0].inputs[0] == out:
            # the output gate, per head
            self.want_columns(gate[0].inputs[1], self.head_columns(q_heads, d), "column-parallel by q head (gate)",
                              node)
            out = gate[0].outputs[0]
        o_proj = self.single_linear_reader(out, node)
        self.row_parallel(o_proj, lambda r: slice(r * hq_l * d, (r + 1) * hq_l * d))
        kv = f"{hk_l} KV head{'s' if hk_l > 1 else ''}" + ("" if hk >= n else f" (of {hk}, shared by "
                                                                          f"{n // hk} ranks)")
        self.state.decide(NAME, node.name, f"{hq_l} query heads and {kv} per rank; {o_proj.name} row-parallel "
                          "+ all_reduce", "each rank attends with whole heads; o_proj's partial sums add up")

    def trace(self, value: str, attn: Node) -> tuple[str, list[Node]]:
        """(the value a linear or split makes that `value` comes from through rope / norm nodes, those nodes)."""
        chain = []
        while True:
            if value not in self.producer:
                self.fail(attn, f"reads {value!r}, which no node produces")
            node, index = self.producer[value]
            if node.op in (*q8.LINEARS, "split"):
                return value, chain
            if node.op in ("rope", "head_rms_norm", "qk_norm_rope_cache"):
                chain.append(node)
                value = node.inputs[index if node.op == "rope" else 0]
                continue
            self.fail(attn, f"reads {value!r} from {node.name} ({node.op}), which this pass cannot follow to its "
                            "projection")

    def heads_attrs(self, node: Node, part: str, hq_l: int, hk_l: int) -> None:
        a = node.attrs
        if node.op == "head_rms_norm":
            a["num_heads"] = hq_l if part == "q" else hk_l
            return
        if "num_heads" in a:
            a["num_heads"] = hq_l
        if "num_kv_heads" in a:
            a["num_kv_heads"] = hk_l

    def local_state(self, name: str, shape: tuple[int, ...]) -> None:
        """The declared state `name` holds `shape` per token / sequence on each rank (its heads only)."""
        g = self.graph
        old = next(s for s in g.state if s.name == name)
        g.state = [StateSpec(s.name, s.kind, s.layer, s.dtype, tuple(shape)) if s is old else s for s in g.state]
        spec = g.inputs[name]
        lead = len(spec.shape) - len(old.shape)
        g.inputs[name] = TensorSpec(spec.dtype, (*spec.shape[:lead], *shape))

    # ------------------------------------------------------------ column requests

    @staticmethod
    def head_columns(heads, width: int):
        """rank -> the columns of its heads (`heads(r)`), `width` each."""
        return lambda r: [h * width + i for h in heads(r) for i in range(width)]

    def want_columns(self, value: str, cols, how: str, node: Node) -> None:
        """Rank r computes only columns `cols(r)` of `value` (made by a linear, a split of one, or a causal
        conv over one); resolved at the end, when every consumer has asked."""
        if value in self.columns:
            self.fail(node, f"reads {value!r}, which another sharded node reads too ({self.columns[value][1]}); "
                            "this pass cannot tell their columns apart")
        self.columns[value] = (cols, how)

    def resolve_columns(self) -> None:
        """Walk the graph backwards from the requested values to the weights that make them: a linear's rows
        (and bias), a split's input (its parts side by side, an unrequested part whole on every rank, e.g. a
        replicated projection merged with a sharded one), a causal conv's channels (weight rows, conv state)."""
        for node in reversed(self.graph.nodes):
            wanted = [self.columns.pop(o, None) for o in node.outputs]
            if not any(wanted):
                continue
            if node.op in q8.LINEARS:
                cols, how = wanted[0]
                self.column_parallel(node, how, cols)
            elif node.op == "split":
                sizes = node.attrs["sizes"]
                offsets = [sum(sizes[:i]) for i in range(len(sizes))]
                parts = [w[0] if w else (lambda r, n=n: range(n)) for w, n in zip(wanted, sizes)]
                node.attrs["sizes"] = [len(list(part(0))) for part in parts]
                how = " | ".join(w[1] if w else "whole" for w in wanted)
                self.want_columns(node.inputs[0], lambda r, offsets=offsets, parts=parts: [
                    o + c for o, part in zip(offsets, parts) for c in part(r)], f"[{how}]", node)
            elif node.op == "causal_conv1d":  # depthwise: a channel's output needs only that channel
                (cols, how), = wanted
                self.rows(node.inputs[1], how, cols)
                conv_state = node.inputs[2]
                self.local_state(conv_state, (len(cols(0)), self.graph.inputs[conv_state].shape[-1]))
                self.want_columns(node.inputs[0], cols, how, node)
            else:
                self.fail(node, f"makes {', '.join(o for o, w in zip(node.outputs, wanted) if w)}, which a sharded "
                                "node reads by columns; this pass shards only linears, splits and causal convs so")
        assert not self.columns, self.columns

    # ------------------------------------------------------------ MLP and experts

    def intermediate_block(self, node: Node, inter: int) -> int:
        if inter % self.n:
            self.fail(node, f"has intermediate size {inter}; --tp must divide it (each rank computes a block of "
                            f"I/N gate/up columns and the matching down_proj rows); choose a --tp that divides "
                            f"{inter}")
        return inter // self.n

    def mlp(self, node: Node) -> None:
        """A gated MLP: linear_gated_act, or gated_act (gated_act_quant, gated_act_linear_fp8: the down
        projection itself) of a merged [gate; up] linear or of two linears (8-bit ones too)."""
        if node.op == "linear_gated_act":
            halves = [node]  # rows [gate | up] of one weight
        else:
            halves = [self.producer[v][0] for v in node.inputs[:1 if node.op == "gated_act_linear_fp8" else 2]]
            if any(s.op not in q8.LINEARS for s in halves):
                self.fail(node, "requires its gate and up from linears")
        inter = self.graph.weights[halves[0].inputs[1]].shape[0] // (2 if len(halves) == 1 else 1)
        block = self.intermediate_block(node, inter)
        if len(halves) == 1:
            how, index = "column-parallel block: [gate rows, up rows] of the rank", \
                lambda r: [*range(r * block, (r + 1) * block), *range(inter + r * block, inter + (r + 1) * block)]
        else:
            how, index = "column-parallel block", lambda r: list(range(r * block, (r + 1) * block))
        for linear in halves:
            self.column_parallel(linear, how, index)
        down = node if node.op == "gated_act_linear_fp8" else self.single_linear_reader(node.outputs[0], node)
        self.row_parallel(down, lambda r: slice(r * block, (r + 1) * block))
        self.state.decide(NAME, node.name, f"gate/up columns and {down.name} rows in blocks of {block} of {inter} "
                          "per rank; all_reduce after down", "column- then row-parallel: one all_reduce per MLP")

    def experts(self, node: Node) -> None:
        shard_experts.experts(self, node)

    # ------------------------------------------------------------ vocabulary

    def vocab_rows(self, node: Node, weight: str) -> int:
        vocab = self.full[weight].shape[0]  # a tied table may be sharded already: its spec is the rank's
        local = math.ceil(vocab / self.n)

        def pick(t: torch.Tensor, r: int) -> torch.Tensor:
            part = t[r * local:(r + 1) * local]
            pad = local - part.shape[0]
            return torch.cat([part, part.new_zeros(pad, *part.shape[1:])]) if pad else part

        self.shard(weight, f"vocabulary-parallel: {local} rows per rank (zero rows pad {vocab} to "
                           f"{local * self.n})", pick)
        return local

    def embedding(self, node: Node) -> None:
        local = self.vocab_rows(node, node.inputs[1])
        self.per_rank_start(VOCAB_START, local)
        ids = f"{node.name}.local_ids"
        shard_node = Node(f"{node.name}.shard_ids", "shard_ids", [node.inputs[0], VOCAB_START], [ids],
                          {"size": local})
        self.graph.nodes.insert(self.graph.nodes.index(node), shard_node)
        node.inputs[0] = ids
        self.reduce_after(node)
        self.state.decide(NAME, node.name, f"vocabulary-parallel: {local} rows per rank, masked lookup + all_reduce",
                          "a rank holds only its rows of the table")

    def logits(self, node: Node) -> None:
        width = self.full[node.inputs[2]].shape[0]  # the logits' columns before sharding
        self.vocab_rows(node, node.inputs[2])
        out = node.outputs[0]
        node.outputs[0] = f"{out}.shard"
        self.after.setdefault(node.name, []).append(Node(f"{node.name}.all_gather", "all_gather", [f"{out}.shard"],
                                                         [out], {"size": width}))
        self.state.decide(NAME, node.name, "vocabulary-parallel lm_head + all_gather of the logits columns",
                          "each rank computes its vocabulary rows' logits; the sampler needs them all")

