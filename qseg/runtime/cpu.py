"""What the CPU can do, as far as deployed qseg models care.

Two machine facts change what a runtime computes from the same file: whether
the CPU has bf16 arithmetic (OpenVINO's CPU plugin then runs float layers in
bf16 unless told otherwise) and whether it has VNNI (without it, int8 kernels
sum pairs of u8 x s8 products in int16, and oneDNN halves the weights of a conv
whose input is signed int8 to keep that sum from saturating).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import cache

__all__ = ["CpuFeatures", "cpu_features"]


def _proc_cpuinfo() -> tuple[str, frozenset[str]]:
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's name and the instruction-set flags that change deployed results.

    ``flags`` holds the int8- and bf16-relevant flags of ``/proc/cpuinfo``
    (``avx2``, ``avx512*``, ``*vnni*``, ``amx*``); empty where the file does not
    exist. ``openvino_bf16`` is OpenVINO's own answer (``BF16`` among the CPU
    plugin's optimization capabilities), ``None`` when OpenVINO is not installed.

    Example:
        >>> f = CpuFeatures("Zen4", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}), True)
        >>> f.vnni, f.bf16, f.describe()
        (True, True, 'Zen4 (avx2 avx512_bf16 avx512_vnni avx512f)')
    """

    name: str
    flags: frozenset[str]
    openvino_bf16: bool | None = None

    @property
    def vnni(self) -> bool:
        """Whether int8 dot products accumulate in int32 directly (AVX-512 VNNI or AVX-VNNI)."""
        return any("vnni" in f for f in self.flags)

    @property
    def bf16(self) -> bool:
        """Whether a default OpenVINO compile runs float layers in bf16 on this CPU
        (OpenVINO's answer where it is installed, else the ``avx512_bf16`` / AMX flags)."""
        if self.openvino_bf16 is not None:
            return self.openvino_bf16
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    def describe(self) -> str:
        """One line for benchmark tables and test reports: name and flags.

        Example:
            >>> CpuFeatures("Zen3", frozenset({"avx2"})).describe()
            'Zen3 (avx2)'
        """
        return f"{self.name} ({' '.join(sorted(self.flags)) or 'no int8/bf16 flags'})"


def _relevant(flag: str) -> bool:
    return flag == "avx2" or "vnni" in flag or flag.startswith(("avx512", "amx"))


@cache
def cpu_features() -> CpuFeatures:
    """The features of the CPU this process runs on (read once).

    Example:
        >>> features = cpu_features()
        >>> isinstance(features.vnni, bool) and isinstance(features.bf16, bool)
        True
    """
    name, flags = _proc_cpuinfo()
    try:
        import openvino as ov

        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        openvino_bf16: bool | None = "BF16" in capabilities
    except ImportError:
        openvino_bf16 = None
    return CpuFeatures(name, frozenset(f for f in flags if _relevant(f)), openvino_bf16)
