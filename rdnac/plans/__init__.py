"""The plan file: what the compiler writes and the runtime reads (see format.py)."""

from rdnac.plans.format import FORMAT_VERSION, Plan, read_plan, weights_path_for, write_plan  # noqa: F401
