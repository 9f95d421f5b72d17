"""The mixture-of-experts feed-forward body (`MoE`), shared by the MoE families (Qwen3-MoE, GPT-OSS).

    x -> router linear (+ bias) -> moe_route -> moe_experts(x, weights, ids, w13, w2 (, b13, b2))

It slots into a layer as `Residual(MoE(...), ...)`, like `GatedMLP`. The ops
and their contract are in `rdnac.ir.moe`: every expert's gate and up rows
stacked into one w13 [E, 2I, H] (gate rows, then up rows) and its down
projection into w2 [E, H, I], weights [N, K] like `linear`'s. This module
turns what checkpoints store into that layout, once, at compile time:

- "per_expert": `experts.{e}.{gate,up,down}_proj.weight` (Qwen3-MoE and
  Mixtral-style checkpoints on the Hub, and what transformers' save_pretrained
  writes for them), biases `experts.{e}.{gate,up,down}_proj.bias`.
- "stacked": `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj`
  [E, H, I] (transformers' in-memory layout of Qwen3-MoE), biases
  `experts.gate_up_proj_bias` [E, 2I], `experts.down_proj_bias` [E, H].
- "stacked_transposed": the same names as [E, H, 2I] and [E, I, H] (x @ W,
  GPT-OSS), transposed here.
- "auto": per_expert when expert 0's gate_proj is there, else stacked.

`interleaved=True` says gate and up alternate along 2I (GPT-OSS: gate at
even, up at odd columns, biases too); they are de-interleaved here so every
kernel sees one layout. Each layer's routing and its expert layout go to
the decision log.

A family configures the body with its config keys and flags, e.g. GPT-OSS:
`MoE(router="router", router_bias=True, scoring="topk_softmax",
renormalize=False, intermediate_key="intermediate_size", act="swiglu_oai",
alpha="swiglu_alpha", limit="swiglu_limit", expert_bias=True,
layout="stacked_transposed", interleaved=True)`. A body whose expert
weights are not float (MXFP4 blocks and scales) overrides `expert_inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rdnac.compiler.frontend.blocks import Model
from rdnac.compiler.frontend.spec import config_file, flag
from rdnac.errors import UnsupportedModelError
from rdnac.ir.moe import ACTS, SCORINGS

LAYOUTS = ("auto", "per_expert", "stacked", "stacked_transposed")


@dataclass(frozen=True)
class MoE:
    """Top-k routed experts. Flags given as a str name the config key that holds them (bool: absent is
    False; number: required, the spec's `defaults` may supply it)."""

    router: str = "gate"  # the router's module leaf under `module`
    router_bias: bool | str = False
    scoring: str = "softmax_topk"  # rdnac.ir.moe SCORINGS
    renormalize: bool | str = "norm_topk_prob"  # softmax_topk only: divide the k weights by their sum
    num_experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts")  # the first present is read
    top_k_key: str = "num_experts_per_tok"
    intermediate_key: str = "moe_intermediate_size"
    act: str | None = None  # None: the model's gated act (hidden_act); else an rdnac.ir.moe ACTS entry
    alpha: float | str = 1.702  # swiglu_oai only
    limit: float | str = 7.0  # swiglu_oai only
    expert_bias: bool | str = False
    layout: str = "auto"  # LAYOUTS
    interleaved: bool = False  # gate/up alternate along 2I in the checkpoint
    module: str = "mlp"  # the body's checkpoint module under model.layers.N
    # DeepSeek's routing (rdnac.ir.moe GROUP_SCORINGS): config keys of the groups and the weights' factor,
    # and the router's float32 correction bias (a tensor leaf under `module`)
    group_keys: tuple[str, str] | None = None  # (n_group, topk_group)
    scaling_key: str | None = None  # routed_scaling_factor
    correction_bias: str | None = None  # "gate.e_score_correction_bias"
    float_router: bool = False  # the router stays float in an FP8 checkpoint whatever quantization_config says

    def emit(self, m: Model, x: str, layer: int) -> str:
        b = m.b
        p, n = f"model.layers.{layer}.{self.module}", f"layers.{layer}"
        num_experts, top_k, inter = self.dims(m)
        logits = b.linear(x, f"{p}.{self.router}", num_experts, m.hidden, flag(m.config, self.router_bias),
                          f"{n}.router", allow_fp8=not self.float_router)
        route = {"top_k": top_k, "scoring": self.scoring}
        keys = [next(k for k in self.num_experts_keys if k in m.config), self.top_k_key]
        if self.scoring in ("softmax_topk", "sigmoid_group_topk"):  # topk_softmax's k weights are a softmax already
            route["renormalize"] = flag(m.config, self.renormalize)
            keys += [self.renormalize] if isinstance(self.renormalize, str) else []
        ins = [logits]
        if self.correction_bias:
            ins.append(b.weight(f"{p}.{self.correction_bias}", (num_experts,), dtype="float32"))
        route.update(self._deepseek_route(m, num_experts, top_k, keys))
        weights, ids = b.node("moe_route", ins, f"{n}.route", 2, **route)
        extra = "".join(f", {k} {route[k]}" for k in ("n_group", "topk_group", "routed_scaling_factor") if k in route)
        b.decide(f"{n}.route", f"{self.scoring} top-{top_k} of {num_experts} experts"
                 + (", renormalized" if route.get("renormalize") else "") + extra
                 + (", correction bias for selection only" if self.correction_bias else ""),
                 f"{', '.join(keys)} from config.json")
        op, ins, *op_attrs = self.expert_inputs(m, layer, num_experts, inter)
        act = self.act or m.act
        attrs = {"act": act, **(op_attrs[0] if op_attrs else {})}
        if act == "swiglu_oai":
            attrs.update(alpha=float(self._number(m, self.alpha, "alpha")),
                         limit=float(self._number(m, self.limit, "limit")))
        return b.node(op, [x, weights, ids, *ins], f"{n}.experts", **attrs)[0]

    def _deepseek_route(self, m: Model, num_experts: int, top_k: int, keys: list[str]) -> dict:
        """moe_route's group and scaling attributes from config.json, checked (empty for other scorings)."""
        out, where = {}, config_file(m.b.checkpoint.path)
        if self.group_keys:
            groups, topk_group = (self._number(m, k, "group count") for k in self.group_keys)
            if not isinstance(groups, int) or groups < 1 or num_experts % groups:
                raise UnsupportedModelError(f"{where}: {self.group_keys[0]} requires a positive divisor of the "
                                            f"{num_experts} routed experts; got {groups!r}")
            if not isinstance(topk_group, int) or not 1 <= topk_group <= groups \
                    or top_k > topk_group * (num_experts // groups):
                raise UnsupportedModelError(f"{where}: {self.group_keys[1]} requires 1..{groups} groups holding at "
                                            f"least {self.top_k_key} ({top_k}) experts; got {topk_group!r}")
            out.update(n_group=groups, topk_group=topk_group)
            keys += list(self.group_keys)
        if self.scaling_key:
            out["routed_scaling_factor"] = float(self._number(m, self.scaling_key, "routed scaling factor"))
            keys.append(self.scaling_key)
        return out

    def dims(self, m: Model) -> tuple[int, int, int]:
        """(num_experts, top_k, expert intermediate size) from config.json, checked."""
        c, where = m.config, config_file(m.b.checkpoint.path)
        key = next((k for k in self.num_experts_keys if k in c), self.num_experts_keys[0])
        num_experts = self._number(m, key, "experts")
        top_k = self._number(m, self.top_k_key, "top-k")
        inter = self._number(m, self.intermediate_key, "expert intermediate size")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise UnsupportedModelError(f"{where}: {key} requires a positive number of experts for an MoE layer; "
                                        f"got {num_experts!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise UnsupportedModelError(f"{where}: {self.top_k_key} requires 1..{key} ({num_experts}) experts per "
                                        f"token; got {top_k!r}")
        if not isinstance(inter, int) or inter < 1:
            raise UnsupportedModelError(f"{where}: {self.intermediate_key} requires a positive integer; got {inter!r}")
        act = self.act or m.act
        if act not in ACTS:
            raise UnsupportedModelError(f"{where}: expert activation {act!r} is not supported by moe_experts; "
                                        f"supported: {', '.join(ACTS)}")
        assert self.scoring in SCORINGS and self.layout in LAYOUTS, (self.scoring, self.layout)
        return num_experts, top_k, inter

    def _number(self, m: Model, value: float | str, what: str):
        if not isinstance(value, str):
            return value
        if m.config.get(value) is None:
            raise UnsupportedModelError(f"{config_file(m.b.checkpoint.path)}: requires {value} (the MoE {what}); "
                                        "got none")
        return m.config[value]

    # ------------------------------------------------------------ expert weights

    def expert_inputs(self, m: Model, layer: int, num_experts: int, inter: int) -> tuple[str, list[str]]:
        """(op, expert weight inputs): moe_experts with w13, w2 (and b13, b2) in the IR's layout."""
        b, hidden = m.b, m.hidden
        p = f"model.layers.{layer}.{self.module}.experts"
        layout = self.layout
        if layout == "auto":
            layout = "stacked" if (b.has(f"{p}.gate_up_proj") and not b.has(f"{p}.0.gate_proj.weight")) \
                else "per_expert"
        e, i2 = num_experts, 2 * inter
        has_bias = flag(m.config, self.expert_bias)
        scheme = b.fp8_scheme(f"{p}.0.gate_proj") if layout == "per_expert" and not has_bias else None
        if scheme is not None and scheme.weight_scheme == "block" and scheme.act_scheme == "dynamic_group":
            return fp8_block_experts(m, layer, p, e, inter, scheme)
        if layout == "per_expert":
            gate = [(f"{p}.{j}.gate_proj.weight", (inter, hidden)) for j in range(e)]
            up = [(f"{p}.{j}.up_proj.weight", (inter, hidden)) for j in range(e)]
            down = [(f"{p}.{j}.down_proj.weight", (hidden, inter)) for j in range(e)]
            w13 = b.derived_weight(f"{p}.w13", gate + up, lambda t: torch.cat(
                [torch.stack(t[:e]), torch.stack(t[e:])], dim=1), (e, i2, hidden), "stack gate, up")
            w2 = b.derived_weight(f"{p}.w2", down, torch.stack, (e, hidden, inter), "stack")
            biases = []
            if has_bias:
                gate_b = [(f"{p}.{j}.gate_proj.bias", (inter,)) for j in range(e)]
                up_b = [(f"{p}.{j}.up_proj.bias", (inter,)) for j in range(e)]
                biases = [b.derived_weight(f"{p}.b13", gate_b + up_b, lambda t: torch.cat(
                              [torch.stack(t[:e]), torch.stack(t[e:])], dim=1), (e, i2), "stack gate, up"),
                          b.derived_weight(f"{p}.b2", [(f"{p}.{j}.down_proj.bias", (hidden,)) for j in range(e)],
                                           torch.stack, (e, hidden), "stack")]
            how = f"stacked {e} experts' gate_proj, up_proj and down_proj"
        else:
            transposed = layout == "stacked_transposed"
            gu_shape, d_shape = ((e, hidden, i2), (e, inter, hidden)) if transposed else \
                ((e, i2, hidden), (e, hidden, inter))
            w13 = b.derived_weight(f"{p}.w13", [(f"{p}.gate_up_proj", gu_shape)],
                                   lambda t: self._gate_up(t[0].transpose(1, 2) if transposed else t[0]),
                                   (e, i2, hidden), "transpose" if transposed else "copy")
            w2 = b.derived_weight(f"{p}.w2", [(f"{p}.down_proj", d_shape)],
                                  lambda t: t[0].transpose(1, 2) if transposed else t[0], (e, hidden, inter),
                                  "transpose" if transposed else "copy")
            biases = []
            if has_bias:
                biases = [b.derived_weight(f"{p}.b13", [(f"{p}.gate_up_proj_bias", (e, i2))],
                                           lambda t: self._gate_up(t[0]), (e, i2), "copy"),
                          b.derived_weight(f"{p}.b2", [(f"{p}.down_proj_bias", (e, hidden))], lambda t: t[0],
                                           (e, hidden), "copy")]
            how = f"{layout} gate_up_proj {list(gu_shape)} and down_proj {list(d_shape)}" + \
                  (", transposed" if transposed else "")
        if self.interleaved and layout != "per_expert":
            how += "; gate/up columns de-interleaved (gate even, up odd)"
        b.decide(f"layers.{layer}.experts", f"w13 [{e}, {i2}, {hidden}], w2 [{e}, {hidden}, {inter}]"
                 + (" with biases" if has_bias else ""),
                 f"{how}, once at compile time: every kernel reads one stacked layout")
        return "moe_experts", [w13, w2, *biases]

    def _gate_up(self, t: torch.Tensor) -> torch.Tensor:
        """[..., 2I, *] rows in the IR's order (gate, then up), de-interleaved if the checkpoint alternates."""
        if not self.interleaved:
            return t
        return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)


def fp8_block_experts(m: Model, layer: int, p: str, e: int, inter: int, scheme) -> tuple[str, list[str], dict]:
    """`moe_experts_fp8_block` over per-expert FP8 linears with block scales (DeepSeek-V3/R1's native
    checkpoints: `weight_scale_inv` per 128x128 block): bits and scales stacked as stored, nothing
    dequantized. w13's scales are the gate's blocks then the up's (`rdnac.ir.moe`)."""
    b, hidden = m.b, m.hidden
    bn, bk = scheme.block_size
    gate, up, down = ([b.fp8_bits_and_scale(f"{p}.{j}.{proj}", shape, scheme) for j in range(e)]
                      for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                          ("down_proj", (hidden, inter))))
    u8 = lambda t: t.view(torch.uint8)  # noqa: E731 -- stack the bytes: the bits are kept, never converted
    w13 = torch.stack([torch.cat([u8(g[0]), u8(u[0])]) for g, u in zip(gate, up)]).view(torch.float8_e4m3fn)
    s13 = torch.stack([torch.cat([g[1], u[1]]) for g, u in zip(gate, up)])
    w2 = torch.stack([u8(d[0]) for d in down]).view(torch.float8_e4m3fn)
    s2 = torch.stack([d[1] for d in down])
    src = f"{b.source(p + '.0.gate_proj.weight')} ... {b.source(p + f'.{e - 1}.down_proj.weight')}"
    ins = [b.add_weight(f"{p}.w13", w13, scheme.tag, f"stack gate, up({src})"),
           b.add_weight(f"{p}.w13_scale", s13, "fp8-scale", f"stack gate, up scales({src})"),
           b.add_weight(f"{p}.w2", w2, scheme.tag, f"stack down({src})"),
           b.add_weight(f"{p}.w2_scale", s2, "fp8-scale", f"stack down scales({src})")]
    b.decide(f"layers.{layer}.experts", f"FP8 experts kept {scheme.tag}: w13 [{e}, {2 * inter}, {hidden}] e4m3fn + "
             f"scales {list(s13.shape)}, w2 [{e}, {hidden}, {inter}] + scales {list(s2.shape)}; activations "
             f"{scheme.act_scheme} (per token and {bk} columns)",
             f"{e} experts' gate_proj, up_proj and down_proj stacked as stored (bits and {bn}x{bk} block scales), "
             "once at compile time: moe_experts_fp8_block reads one stacked layout")
    return "moe_experts_fp8_block", ins, {"fp8_format": "e4m3fn", "act_scheme": scheme.act_scheme,
                                           "block_size": [bn, bk]}
