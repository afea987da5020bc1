"""What the packed kernels take from the host and its environment, without numba: the instruction set
(``$BITSWEEP_KERNEL_ISA``) and how one-token kernels prefetch (``$BITSWEEP_KERNEL_PREFETCH``). bitsweep.kernels.simd
compiles with these; the workflow's preflight (the bitnet backend's) reads them before any job runs, so a typo in
either is an error there and not in the first bitnet job.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from bitsweep.errors import ConfigError

ENV = "BITSWEEP_KERNEL_ISA"
ISAS = ("avx512vnni", "avx512bw", "avxvnni", "avx2", "portable")  # auto's order of preference
# /proc/cpuinfo flags and LLVM target features each path needs
CPU_FLAGS = {
    "avx512vnni": ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
    "avx512bw": ("avx2", "avx512f", "avx512bw", "avx512vl"),
    "avxvnni": ("avx2", "avx_vnni"),
    "avx2": ("avx2",),
    "portable": (),
}
LLVM_FEATURES = {
    "avx512vnni": ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"),
    "avx512bw": ("avx2", "avx512f", "avx512bw", "avx512vl"),
    "avxvnni": ("avx2", "avxvnni"),
    "avx2": ("avx2",),
    "portable": (),
}
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512vbmi", "avx_vnni", "amx_int8", "amx_bf16")  # fmt: skip


@cache
def cpuinfo(field: str) -> str:
    """The value of ``field`` for the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """The ``flags`` of the first CPU in /proc/cpuinfo (empty where there is none)."""
    return frozenset(cpuinfo("flags").split())


def llvm_features() -> frozenset[str]:
    """The x86 features numba compiles for: NUMBA_CPU_FEATURES if set, else the host's."""
    from llvmlite import binding as llvm

    text = os.environ.get("NUMBA_CPU_FEATURES") or llvm.get_host_cpu_features().flatten()
    return frozenset(f[1:] for f in text.split(",") if f.startswith("+"))


def available_isas() -> list[str]:
    """The paths this machine can run, best first (``portable`` always)."""
    flags, features = cpu_flags(), llvm_features()
    return [isa for isa in ISAS if set(CPU_FLAGS[isa]) <= flags and set(LLVM_FEATURES[isa]) <= features]


def requested_isa(requested: str | None = None) -> str:
    """``requested`` (default: ``$BITSWEEP_KERNEL_ISA``, else ``auto``), normalised: ``auto`` or a known ISA
    (whether this machine has it is :func:`select_isa`'s question: a cluster's nodes may differ from the host the
    workflow starts on)."""
    requested = (requested or os.environ.get(ENV) or "auto").strip().lower()
    if requested != "auto" and requested not in ISAS:
        raise ConfigError(f"{ENV}={requested!r}: known: auto, {', '.join(ISAS)}")
    return requested


def select_isa(requested: str | None = None) -> str:
    """:func:`requested_isa` checked against :func:`available_isas` (``auto``: the best available)."""
    requested = requested_isa(requested)
    available = available_isas()
    if requested == "auto":
        return available[0]
    if requested not in available:
        raise ConfigError(
            f"{ENV}={requested!r}: this CPU / numba target supports only {', '.join(available)}"
        )
    return requested


# How a kernel prefetches its weight stream, (bytes ahead, cache level): a software prefetch per block of chunks
# (per cache line in group batches), ``ahead`` bytes further on, into L1 (level 1) or L2 (level 2); (0, 0): none.
# One token (GEMV) per pass on the Intel AVX-512 host: a whole 4 KiB page ahead into L1, as the hardware streamer
# stops at page boundaries and at 1 KiB (one 4096-wide TQ2_0 row) the next row arrived late (4096x4096 streamed
# from memory, interleaved, one thread: TQ2_0 / binary / int4 1.12x / 1.18x / 1.11x faster at 4096 than at 1024,
# 8192 no better). Four tokens per pass do 4x the work per byte; there 1 KiB was as fast or up to 7% faster (int4).
PREFETCH_GEMV_L1, PREFETCH_BATCH = (4096, 1), (1024, 1)
NO_PREFETCH = (0, 0)
# On the Zen 4 host, the L1 prefetches made the int4 GEMV 1.7x slower and the float16 head GEMV 1.9x; 16 KiB
# ahead into L2 instead (what the L2 streamer does itself, further ahead): see software_prefetch.
PREFETCH_GEMV_L2 = (16384, 2)
PREFETCH_ENV = "BITSWEEP_KERNEL_PREFETCH"


def cpu_vendor() -> str:
    """``vendor_id`` of the first CPU in /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"; empty where none)."""
    return cpuinfo("vendor_id")


def software_prefetch() -> tuple[int, int]:
    """How one-token kernels (GEMV) prefetch their weight stream, ``(bytes ahead, cache level)``
    (:data:`NO_PREFETCH`: not at all): ``$BITSWEEP_KERNEL_PREFETCH`` (``0``; ``1``: this host's default;
    ``BYTES:L1`` or ``BYTES:L2``), else by vendor: :data:`PREFETCH_GEMV_L1` on Intel, :data:`PREFETCH_GEMV_L2` on
    AMD (measured below). Batches always take :data:`PREFETCH_BATCH`."""
    value = os.environ.get(PREFETCH_ENV, "").strip()
    default = PREFETCH_GEMV_L2 if cpu_vendor() == "AuthenticAMD" else PREFETCH_GEMV_L1
    if value in ("", "1"):
        return default
    if value == "0":
        return NO_PREFETCH
    ahead, _, level = value.upper().partition(":L")
    if ahead.isdigit() and int(ahead) > 0 and level in ("1", "2"):
        return int(ahead), int(level)
    raise ConfigError(f"{PREFETCH_ENV}={value!r}: 0, 1 (this host's default) or BYTES:L1 / BYTES:L2")
