"""The IR: the contract between the compiler and the runtime.

It lives outside `rdnac.compiler` because the runtime must run it (the cpu
device interprets the plan graph) and the runtime imports nothing from the
compiler. `graph` holds the data structures, `ops` the closed op set with a
shape rule and a torch reference for each op, `interpreter` runs a graph with
those references, and `verify` checks a graph and names the node at fault.
"""

from rdnac.ir.graph import Graph, Node, TensorSpec, WeightSpec  # noqa: F401
