"""Builds and loads the CPU decode kernels (cpu_kernels.cpp) once per machine.

The extension is compiled with the local compiler for this CPU (-march=native)
into the cache folder, so the first use takes about a minute and later starts
load it directly. Where it cannot be built (no compiler, not x86/Linux), the
callers fall back to plain torch ops: correct and slower, and no longer
batch-invariant, so greedy speculative output can then differ from standard
decoding at exact near-ties of the logits.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from ..paths import cache_dir

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")


def build_dir() -> Path:
    """Where the compiled extension lives: the kernels folder of the shared cache."""
    return cache_dir() / "kernels"


@functools.lru_cache(maxsize=1)
def cpu_kernels():
    """The compiled module, or None where it cannot be built."""
    if os.environ.get("SPECCHAT_DISABLE_KERNELS") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        bin_dir = Path(sys.executable).parent  # ninja from the venv
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        folder = build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        return load(
            name="specchat_cpu_kernels",
            sources=[str(SOURCE)],
            # -fopenmp: at::parallel_for is a header template that runs
            # serially unless this extension itself is built with OpenMP.
            extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            verbose=False,
        )
    except Exception as error:  # a missing compiler must not stop the app
        print(f"specchat: CPU kernels unavailable ({type(error).__name__}: {error}); using torch ops", file=sys.stderr)
        return None
