"""Builds and loads the CPU decode kernels (cpu_kernels.cpp), one variant per instruction set.

Contract: `cpu_kernels(variant=None)` returns the compiled module of one
variant, or None where it cannot be built. Each variant is the same source
compiled with other flags, under its own module name and folder in the cache
(cache_dir()/kernels/<variant>), so the first use of each takes ~15-25 s and
later starts load it directly:

    avx512    -march=native, on CPUs with AVX-512 F/BW (VNNI used where present)
    avxvnni   -march=native without AVX-512, on CPUs with AVX-VNNI (Alder Lake and later)
    avx2      -march=native without AVX-512 and AVX-VNNI, on CPUs with AVX2 + FMA
    portable  no -march: SSE2 on x86-64, NEON on Arm, plain C++ elsewhere

Without an argument the best variant this CPU runs is loaded, and
`rival_variants(best)` names the one other variant worth timing against it
at load (chatapp.llama does): the 256-bit build on an AVX-512 CPU, which
decodes as fast or faster on some (AMD's Zen 4 runs AVX-512 on 256-bit units);
$SPECCHAT_KERNEL_VARIANT names another (the tests and the benchmark run the
AVX2 variant on AVX-512 machines that way), `torch` or
$SPECCHAT_DISABLE_KERNELS=1 none. Every variant is batch-invariant (see
cpu_kernels.cpp). Where none can be built (no compiler), the callers fall
back to plain torch ops: correct and slower, and no longer batch-invariant,
so greedy speculative output can then differ from standard decoding at exact
near-ties of the logits.

It knows nothing about models: chatapp.llama decides where the kernels run.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path

from ..paths import cache_dir

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
VARIANT_ENV = "SPECCHAT_KERNEL_VARIANT"
TORCH = "torch"  # the value of VARIANT_ENV that turns the kernels off

# Best first. -ffp-contract=off: the compiler must not fuse or split a
# multiply-add on its own, so every variant's sums are exactly the chains the
# source writes. No OpenMP: the kernels run their own team of threads (see
# cpu_kernels.cpp), so a compiler without it (Apple clang) builds them too.
VARIANT_FLAGS: dict[str, list[str]] = {
    "avx512": ["-march=native"],
    "avxvnni": ["-march=native", "-mno-avx512f"],
    "avx2": ["-march=native", "-mno-avx512f"],  # + -mno-avxvnni where the CPU has it (see variant_flags)
    "portable": [],
}
VARIANTS = tuple(VARIANT_FLAGS)
COMMON_FLAGS = ["-O3", "-ffp-contract=off"]

# The CPU flags (as /proc/cpuinfo names them) each variant needs.
_NEEDS: dict[str, set[str]] = {
    "avx512": {"avx512f", "avx512bw", "avx2", "fma"},
    "avxvnni": {"avx_vnni", "avx2", "fma"},
    "avx2": {"avx2", "fma"},
    "portable": set(),
}


def build_dir() -> Path:
    """Where the compiled extensions live: the kernels folder of the shared cache."""
    return cache_dir() / "kernels"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo); from torch's capability elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return _flags_from_torch()


def _flags_from_torch() -> frozenset[str]:
    import torch  # lazy: only where /proc/cpuinfo is missing

    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    if capability.startswith("AVX512"):
        return frozenset({"avx512f", "avx512bw", "avx2", "fma"})
    if capability.startswith("AVX2"):
        return frozenset({"avx2", "fma"})
    return frozenset()


def supported_variants(flags: frozenset[str] | None = None) -> list[str]:
    """The variants this CPU can run, best first (x86-64 variants only on x86-64)."""
    flags = cpu_flags() if flags is None else flags
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return [name for name in VARIANTS if name == "portable" or (x86 and _NEEDS[name] <= flags)]


def rival_variants(variant: str, flags: frozenset[str] | None = None) -> list[str]:
    """The variants worth timing against `variant` on this CPU (best first): on an
    AVX-512 CPU the best 256-bit one (avxvnni, else avx2); none otherwise (avxvnni
    and avx2 share their float path, and the portable one is never faster)."""
    if variant != "avx512":
        return []
    return [name for name in supported_variants(flags) if name in ("avxvnni", "avx2")][:1]


def chosen_variant() -> str | None:
    """$SPECCHAT_KERNEL_VARIANT if set (None for `torch`), else the best this CPU runs."""
    if os.environ.get("SPECCHAT_DISABLE_KERNELS") == "1":
        return None
    forced = os.environ.get(VARIANT_ENV, "").strip().lower()
    if forced == TORCH:
        return None
    if forced:
        if forced not in VARIANTS:
            raise ValueError(f"{VARIANT_ENV}={forced!r}: expected one of {', '.join(VARIANTS + (TORCH,))}")
        if forced not in supported_variants():
            raise ValueError(
                f"{VARIANT_ENV}={forced}: this CPU cannot run it (it runs {', '.join(supported_variants())})"
            )
        return forced
    return supported_variants()[0]


def variant_forced() -> bool:
    """Whether the environment names the variant (then nothing else chooses one)."""
    return bool(os.environ.get(VARIANT_ENV, "").strip()) or os.environ.get("SPECCHAT_DISABLE_KERNELS") == "1"


def variant_flags(variant: str) -> list[str]:
    """The compiler flags of `variant` on this CPU."""
    flags = list(VARIANT_FLAGS[variant])
    if variant == "avx2" and "avx_vnni" in cpu_flags():
        flags.append("-mno-avxvnni")  # only here: a compiler older than GCC 11 does not know the flag
    return flags


def cpu_kernels(variant: str | None = None):
    """The compiled module of `variant`, or None where it cannot be built. Without
    one: the variant $SPECCHAT_KERNEL_VARIANT names, else the best this CPU runs
    that builds (a compiler too old for AVX-512 code still builds avx2)."""
    if variant is not None:
        return _load(variant)
    chosen = chosen_variant()
    if chosen is None:
        return None
    if variant_forced():
        return _load(chosen)
    for name in supported_variants():
        module = _load(name)
        if module is not None:
            return module
    return None


@functools.cache
def _load(variant: str):
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    try:
        from torch.utils.cpp_extension import load  # lazy: pulls in the compiler toolchain helpers

        bin_dir = Path(sys.executable).parent  # ninja from the venv
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        folder = build_dir() / variant
        folder.mkdir(parents=True, exist_ok=True)
        return load(
            name=f"specchat_cpu_kernels_{variant}",
            sources=[str(SOURCE)],
            extra_cflags=COMMON_FLAGS + variant_flags(variant) + [f"-DSPECCHAT_VARIANT={variant}"],
            build_directory=str(folder),
            verbose=False,
        )
    except Exception as error:  # a missing compiler must not stop the app
        print(
            f"specchat: CPU kernels ({variant}) unavailable ({type(error).__name__}: {error}); using torch ops",
            file=sys.stderr,
        )
        return None
