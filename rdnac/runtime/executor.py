"""Run a GPU plan's program: each graph node through its chosen kernel wrapper.

The plan's program maps every node to a kernel wrapper (`module.function` in
`rdnac.kernels`) and a config per step key (`phase:bucket`, see
`step_key`). The same executor runs over real GPU tensors with the plan's
precompiled binaries (AotLauncher), over CPU tensors under the Triton
interpreter (`--interpret`), and over meta tensors with a RecordingLauncher
when the compiler collects the specializations a plan needs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from rdnac.ir.graph import Graph
from rdnac.ir.ops import ATTENTION_OPS
from rdnac.ir.rope_math import rope_inv_freq

# Token-count buckets: a step with T tokens uses the configs of the smallest bucket >= T.
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
PHASES = ("prefill", "decode")

# IR op -> wrapper in rdnac.kernels, per phase where they differ.
WRAPPERS = {
    "embedding": "embedding.embedding",
    "rms_norm": "rms_norm.rms_norm",
    "head_rms_norm": "rms_norm.head_rms_norm",
    "linear": "gemm.linear",
    "linear_fp8": "gemm_fp8.linear_fp8",
    "rope": "rope.rope",
    "kv_cache_write": "kv_cache.kv_cache_write",
    "qk_norm_rope_cache": "qk_norm_rope_cache.qk_norm_rope_cache",
    "attention": {"prefill": "attention.attention_prefill", "decode": "attention_decode.attention_decode"},
    "attention_quant": {"prefill": "attention.attention_quant_prefill",
                        "decode": "attention_decode.attention_quant_decode"},
    "gated_act": "activation.gated_act",
    "linear_gated_act": "gemm_gated.linear_gated_act",
    "add": "elementwise.add",
    "logits": "gemm.logits",
    "rms_norm_quant": "rms_norm_quant.rms_norm_quant",
    "gated_act_quant": "activation_quant.gated_act_quant",
}
# IR ops that need no kernel: the executor computes them itself and the program has no entry for them.
# `split` returns column views of its input; every wrapper that reads a split output (rope, kv_cache_write,
# head_rms_norm, attention's q, gated_act) takes rows with a stride, so no copy is made.
NO_KERNEL_OPS = ("split",)


def bucket_for(num_tokens: int) -> int:
    for b in BUCKETS:
        if num_tokens <= b:
            return b
    raise ValueError(f"a step of {num_tokens} tokens exceeds the largest bucket {BUCKETS[-1]}")


def step_key(phase: str, num_tokens: int) -> str:
    return f"{phase}:{bucket_for(num_tokens)}"


def wrapper_name(op: str, phase: str) -> str:
    w = WRAPPERS[op]
    return w[phase] if isinstance(w, dict) else w


def resolve_wrapper(name: str):
    module, fn = name.split(".")
    return getattr(importlib.import_module(f"rdnac.kernels.{module}"), fn)


@dataclass
class StepMeta:
    """Host-side facts of a step that launch grids need (never read back from the device)."""
    phase: str
    num_tokens: int
    max_query_len: int


class Executor:
    def __init__(self, graph: Graph, program: dict, launcher, device: str | torch.device):
        self.graph = graph
        self.program = program  # node name -> {step key -> {"kernel": wrapper name, "config": {...}}}
        self.launcher = launcher
        self._wrappers: dict[str, object] = {}
        # Each node's wrapper keywords, built once: its attrs plus what the runtime adds (RoPE tables).
        self._kwargs: dict[str, dict] = {}
        for node in graph.nodes:
            self._kwargs[node.name] = dict(node.attrs)
            if node.op in ("rope", "qk_norm_rope_cache"):
                inv_freq, scaling = rope_inv_freq(node.attrs["rotary_dim"], node.attrs["theta"],
                                                  node.attrs.get("scaling"))
                self._kwargs[node.name].update(inv_freq=inv_freq.to(device), attention_scaling=scaling)

    def _wrapper(self, name: str):
        fn = self._wrappers.get(name)
        if fn is None:
            fn = self._wrappers[name] = resolve_wrapper(name)
        return fn

    def run(self, env: dict[str, torch.Tensor], meta: StepMeta, on_node=None) -> dict[str, torch.Tensor]:
        """Execute every node; `env` holds weights and graph inputs and receives all values.

        `on_node(node)` is called before each node runs (the compiler uses it to
        attribute recorded launches to nodes)."""
        key = step_key(meta.phase, meta.num_tokens)
        for node in self.graph.nodes:
            if on_node is not None:
                on_node(node)
            if node.op == "split":
                for name, value in zip(node.outputs, torch.split(env[node.inputs[0]], node.attrs["sizes"], dim=1)):
                    env[name] = value
                continue
            choice = self.program[node.name][key]
            kwargs = self._kwargs[node.name]
            if node.op in ATTENTION_OPS and meta.phase == "prefill":  # its grid is bounded by the longest query
                kwargs = {**kwargs, "max_query_len": meta.max_query_len}
            result = self._wrapper(choice["kernel"])(*(env[n] for n in node.inputs), **kwargs,
                                                     config=choice["config"], launcher=self.launcher)
            if isinstance(result, torch.Tensor):
                result = (result,)
            for name, value in zip(node.outputs, result or ()):
                env[name] = value
        return {name: env[name] for name in self.graph.outputs}
