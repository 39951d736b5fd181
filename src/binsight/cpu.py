"""What the CPU offers, as the fast paths see it: the flags that decide bf16 and int8, after the caps a
developer sets to emulate a smaller CPU.

Three sources, intersected:
- `/proc/cpuinfo` (Linux): what the kernel reports;
- CPUID as NumPy's runtime dispatch reads it: under `qemu-x86_64 -cpu Haswell` (an emulated AVX2-only
  CPU) this is what the process really has, while /proc/cpuinfo still describes the host;
- `ONEDNN_MAX_CPU_ISA` (oneDNN: PyTorch's and OpenVINO's CPU kernels honour it): a cap of AVX2 means
  no AVX-512, no VNNI-512, no bf16 and no AMX for those kernels, so binsight must not pick bf16 either.

`cpu_class` names the row of docs/benchmarks.md a figure belongs to.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

FAST_PATH_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")

# oneDNN's ISA names, lowest first, and the flags each level still allows.
_ONEDNN_LEVELS: tuple[tuple[str, set[str]], ...] = (
    ("SSE41", set()),
    ("AVX", set()),
    ("AVX2", {"avx2"}),
    ("AVX2_VNNI", {"avx2", "avx_vnni"}),
    ("AVX2_VNNI_2", {"avx2", "avx_vnni"}),
    ("AVX512_CORE", {"avx2", "avx_vnni", "avx512f"}),
    ("AVX512_CORE_VNNI", {"avx2", "avx_vnni", "avx512f", "avx512_vnni"}),
    ("AVX512_CORE_BF16", {"avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16"}),
    ("AVX10_1_512", {"avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16"}),
    ("AVX512_CORE_FP16", {"avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16"}),
    ("AVX512_CORE_AMX", set(FAST_PATH_FLAGS)),
    ("AVX10_1_512_AMX", set(FAST_PATH_FLAGS)),
    ("AVX512_CORE_AMX_FP16", set(FAST_PATH_FLAGS)),
    ("AVX10_1_512_AMX_FP16", set(FAST_PATH_FLAGS)),
    ("ALL", set(FAST_PATH_FLAGS)),
)
# NumPy's names for the flags it can see through CPUID.
_NUMPY_NAMES = {
    "avx2": "AVX2",
    "avx512f": "AVX512F",
    "avx512_vnni": "AVX512VNNI",
    "avx512_bf16": "AVX512BF16",
}


def _proc_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split()) & set(FAST_PATH_FLAGS)
    return set()


def _cpuid_hidden() -> set[str]:
    """Flags /proc/cpuinfo claims but CPUID (as this process sees it) denies."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as seen
    except ImportError:
        return set()
    return {flag for flag, name in _NUMPY_NAMES.items() if name in seen and not seen[name]}


def _capped(flags: set[str]) -> set[str]:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    for name, allowed in _ONEDNN_LEVELS:
        if name == cap:
            return flags & allowed
    return flags


@lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """The fast-path flags this process may use (empty off Linux)."""
    hidden = _cpuid_hidden()
    flags = _proc_flags() - hidden
    if hidden:  # an emulated or masked CPU: what NumPy cannot confirm (AVX-VNNI, AMX) is not assumed
        flags -= {"avx_vnni", "amx_bf16", "amx_int8"}
    if "avx512f" not in flags:  # a process without AVX-512 has none of its extensions
        flags -= {"avx512_vnni", "avx512_bf16"}
    return frozenset(_capped(flags))


# bf16 computed in hardware: oneDNN then runs bf16 convolutions at 2x or more the fp32 rate
# (docs/benchmarks.md); elsewhere bf16 is emulated and slower than fp32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def native_bf16() -> bool:
    """AVX512-BF16 or AMX, as the process sees them (the caps a developer sets are honoured)."""
    return bool(cpu_features() & NATIVE_BF16_FLAGS)


def cpu_class() -> str:
    features = cpu_features()
    if "amx_bf16" in features:
        return "AMX"
    if "avx512_bf16" in features:
        return "AVX512-BF16"
    if "avx512f" in features:
        return "AVX-512" + (" VNNI" if "avx512_vnni" in features else "")
    return "AVX2" + (" VNNI" if "avx_vnni" in features else "") if "avx2" in features else "no AVX2"
