"""The GPU machine's software versions, in one place: a change of its Triton is a one-line change here.

The GPU machine (GPU.md) runs Triton 3.6 and torch 2.11; CI and the development machines run newer ones.
A kernel can build under one Triton and not the other, so `make test` also builds plans under this Triton:
the Makefile installs it alone into ENV_DIR (`python3 rdnac/testing/gpu_machine.py ENV_DIR` prints the
name; this file imports nothing, so any python3 runs it), and tests/test_triton_gpu_machine.py puts that
directory first on the path of a subprocess of the main environment's python and compiles there.
"""

TRITON = "3.6.0"
TORCH = "2.11"  # torch is not swapped in the build check: kernel builds depend on Triton only

# Beside .venv in the repository root, named by the version so a new TRITON gets a new directory.
ENV_DIR = f".gpu-triton-{TRITON}"

# What the GPU machine lacks and has no registry to install from: xxhash (plan weights are checksummed with
# it) and the server's fastapi/uvicorn. `make gpu-wheels` downloads these (at the versions of the main
# environment, for the GPU machine's python) into WHEEL_DIR; every device call carries WHEEL_DIR, unzips
# the wheels into a directory and puts it on PYTHONPATH (BENCHMARKS.md).
PYTHON = "3.12"
WHEEL_DIR = ".whl"
WHEELS = ("xxhash", "fastapi", "uvicorn", "starlette", "pydantic", "pydantic-core", "h11", "anyio", "sniffio",
                  "annotated-types", "annotated-doc", "typing-inspection", "typing-extensions", "idna",
                  "opentelemetry-api", "importlib-metadata", "zipp")


def requirements() -> list[str]:
    """WHEELS pinned to the versions installed here (the ones the tests pass with)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in WHEELS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:  # not a dependency of this environment's fastapi: not needed there
            pass
    return pins

if __name__ == "__main__":
    import sys

    value = globals()[sys.argv[1]]
    print(" ".join(value()) if callable(value) else value)
