"""The kernel registry: one record per kernel family, the one place where an IR op meets its kernels.

Each family module of `rdnac.kernels` ends with one `FAMILY = KernelFamily(...)`:
the IR ops it implements and, per op, its wrapper for each phase and its
problem (the shape facts a config depends on); for the family, its config
space, its default config, the cost-model estimator that ranks the space and
the fields a tuning table keys its measurements by. The registry finds the
records by importing the modules of this package (nothing else), and every
consumer reads them from here:

- the executor (runtime) resolves a plan's wrapper names (`"gemm.linear"`,
  stored in the plan's program as data) through `wrapper`, and nothing else;
  `rdnac.kernels.launch.resolve_kernel` imports only this package's modules;
- `select_kernels`, `rdnac tune`, the tuning tables and the cost model take
  an op's family, problem, config space and estimator from the same record.

Nothing here imports `rdnac.compiler`: config spaces are plain functions of a
problem dict, and `cost_model` is the name of an estimator that the compiler
resolves (`rdnac.compiler.cost_model.ESTIMATORS`).

Adding an op touches three files:

1. `rdnac/ir/ops.py`: its `OpDef` (attributes, shape rule, torch reference).
2. Its kernel file `rdnac/kernels/<family>.py`: the Triton kernel, its
   wrapper, `config_space`/`default_config`, and an entry in that file's
   `FAMILY` record (`ops={"my_op": OpKernel(my_wrapper, problem)}`); a new
   file declares a new `FAMILY` and is found without being listed anywhere.
3. Its test: the wrapper against the op's reference under the interpreter.

An op that runs without a kernel is listed in `VIEW_OPS` (the executor
computes it) or `REFERENCE_ONLY_OPS` (no GPU plan contains it), with the reason;
tests/test_kernel_registry.py checks that every op is accounted for once.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import cache
from types import ModuleType
from typing import Any, Callable

# (node attrs, the node's input tensors (meta tensors at compile time), phase, the plan's runtime dict) -> problem
Problem = Callable[[dict, list, str, dict], dict]

PHASES = ("prefill", "decode")

# IR ops the executor computes itself: no kernel, no program entry. `split` returns column views of its
# input; every wrapper that reads a split output (rope, kv_cache_write, head_rms_norm, attention's q,
# gated_act) takes rows with a stride, so no copy is made.
VIEW_OPS = ("split",)
# IR ops no GPU plan contains, with why: the cpu target's interpreter runs them from their reference.
REFERENCE_ONLY_OPS = {"argmax": "GPU plans sample outside the graph (rdnac.runtime.sampling); "
                                "only cpu plans, run by the interpreter, contain it"}


def reference_only_attrs(op: str, attrs: dict) -> str | None:
    """Why a node of an op that has kernels still has none for its attributes, or None: the MLA kernels
    compute the absorbed form only (rdnac/kernels/mla_attention.py), which passes/mla_forms.py sets on
    GPU targets."""
    if op == "mla_attention":
        forms = (attrs.get("prefill_form", "expanded"), attrs.get("decode_form", "expanded"))
        if forms != ("absorbed", "absorbed"):
            return (f"the MLA kernels run the absorbed form in both phases; got prefill_form {forms[0]!r}, "
                    f"decode_form {forms[1]!r}; run the mla_forms pass")
    return None


@dataclass(frozen=True)
class OpKernel:
    """How one IR op runs on a GPU: its wrapper per phase and the problem its configs are chosen for."""

    wrapper: Callable  # the wrapper for both phases, unless `decode` is given
    problem: Problem
    decode: Callable | None = None  # the decode-phase wrapper when it differs (attention)
    # extra wrapper keywords computed once per node when a plan is loaded (RoPE tables): (attrs, device) -> kwargs
    node_kwargs: Callable[[dict, Any], dict] | None = None
    # the prefill wrapper's grid is bounded by the step's longest query (`max_query_len`, a host int)
    takes_max_query_len: bool = False

    def for_phase(self, phase: str) -> Callable:
        assert phase in PHASES, phase
        return self.decode if phase == "decode" and self.decode is not None else self.wrapper


@dataclass(frozen=True)
class KernelFamily:
    """One kernel family: the ops it implements and how the compiler chooses its configs."""

    name: str  # keys config spaces, tuning tables and decision-log reasons
    ops: dict[str, OpKernel]
    config_space: Callable[[dict], list[dict]]
    default_config: Callable[[dict], dict]
    # estimator in rdnac.compiler.cost_model.ESTIMATORS that ranks the space; None: default first, then the rest
    cost_model: str | None = None
    # problem fields a tuning table keys measurements by (rdnac.compiler.tuning); (): never measured
    tuning_key: tuple[str, ...] = ()
    # the size a config depends on, the tuning table's "M" (GEMM rows by default)
    size: Callable[[dict], int] = field(default=lambda problem: problem["M"])


def dtype_name(tensor: Any) -> str:
    """"bfloat16" for a torch.bfloat16 tensor: how problems spell dtypes."""
    return str(tensor.dtype).removeprefix("torch.")


def wrapper_name(fn: Callable) -> str:
    """The name a plan stores for a wrapper: "module.function" within rdnac.kernels ("gemm.linear")."""
    module = fn.__module__.removeprefix(f"{__package__}.")
    assert module != fn.__module__, f"{fn.__module__}.{fn.__name__} is not in rdnac's kernel library"
    return f"{module}.{fn.__name__}"


# ---------------------------------------------------------------- lookups


def kernel_module(name: str) -> ModuleType:
    """The module `name` ("rdnac.kernels.gemm") of rdnac's kernel library; any other name is refused."""
    from rdnac.errors import PlanError

    short = name.removeprefix(f"{__package__}.")
    if short == name or short not in _module_names():
        raise PlanError(f"a plan's kernel requires a module of rdnac's kernel library ({__package__}.*); "
                        f"got {name!r}; do recompile the plan with this rdnac")
    return importlib.import_module(name)


def families() -> dict[str, KernelFamily]:
    """Every family record, by family name."""
    return _registry()[0]


def family(name: str) -> KernelFamily:
    fams = families()
    assert name in fams, f"no kernel family {name!r}; the families are {sorted(fams)}"
    return fams[name]


def for_op(op: str) -> tuple[KernelFamily, OpKernel]:
    """The family implementing IR op `op` and its entry; raises KeyError for an op without a kernel."""
    fam = _registry()[1][op]
    return fam, fam.ops[op]


def has_kernel(op: str) -> bool:
    return op in _registry()[1]


def wrapper_for(op: str, phase: str) -> str:
    """The wrapper name a plan's program stores for `op` in `phase`."""
    return wrapper_name(for_op(op)[1].for_phase(phase))


def wrapper(name: str) -> Callable:
    """The wrapper a plan names ("gemm.linear"); only wrappers of registered families resolve."""
    fn = _registry()[2].get(name)
    if fn is None:
        from rdnac.errors import PlanError

        raise PlanError(f"the plan's program requires kernel wrapper {name!r}, which rdnac's kernel library "
                        f"does not register; do recompile the plan with this rdnac")
    return fn


# ---------------------------------------------------------------- discovery

@cache
def _module_names() -> tuple[str, ...]:
    import rdnac.kernels

    return tuple(sorted(m.name for m in pkgutil.iter_modules(rdnac.kernels.__path__)))


@cache
def _registry() -> tuple[dict[str, KernelFamily], dict[str, KernelFamily], dict[str, Callable]]:
    """(families by name, family by op, wrapper by name), built once."""
    by_name: dict[str, KernelFamily] = {}
    by_op: dict[str, KernelFamily] = {}
    wrappers: dict[str, Callable] = {}
    for module_name in _module_names():
        fam = getattr(importlib.import_module(f"{__package__}.{module_name}"), "FAMILY", None)
        if fam is None:
            continue
        assert isinstance(fam, KernelFamily), f"{module_name}.FAMILY is not a KernelFamily"
        assert fam.name not in by_name, f"kernel family {fam.name!r} is declared twice"
        by_name[fam.name] = fam
        for op, entry in fam.ops.items():
            assert op not in by_op, f"op {op!r} has two kernel families: {by_op[op].name} and {fam.name}"
            by_op[op] = fam
            for phase in PHASES:
                fn = entry.for_phase(phase)
                name = wrapper_name(fn)
                assert wrappers.get(name, fn) is fn, f"two wrappers named {name}"
                wrappers[name] = fn
    return by_name, by_op, wrappers
