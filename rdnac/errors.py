"""User-facing error types.

Internal invariants use bare `assert`; anything a user can cause (a bad
checkpoint, a corrupt plan, an unknown target) raises one of these. The CLI
prints `error: <message>` on one line, with no traceback. Messages follow
"requires X; got Y; do Z" and name the file, tensor or node involved.
"""


class RdnacError(Exception):
    """Base class of every error a user can cause."""


class CheckpointError(RdnacError):
    """The checkpoint (HF directory or GGUF file) cannot be compiled as given."""


class UnsupportedModelError(CheckpointError):
    """The architecture or a feature of it is not supported."""


class PlanError(RdnacError):
    """A plan file or its weights sidecar cannot be loaded."""


class TargetError(RdnacError):
    """Unknown target, or a plan run on a device it was not built for."""


class GraphError(RdnacError):
    """The IR graph is malformed; raised by `verify` naming the node."""


class RequestError(RdnacError):
    """A generation request is invalid (prompt too long, bad sampling options)."""


class EngineError(RdnacError):
    """The engine can no longer run the model (a lost GPU, a broken plan): every request fails until the
    plan is loaded again. Not the request's fault: the server answers 503."""


class RdnacWarning(UserWarning):
    """Something done other than asked, said once (a limit clamped to what the model or plan holds);
    the CLI prints it as one `warning:` line."""
