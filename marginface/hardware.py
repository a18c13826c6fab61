"""What this CPU can do fast, as oneDNN (PyTorch's CPU kernels) will actually use it.

The project's machines are not one CPU: an Intel Xeon with AMX (bf16/int8 tiles), AMD EPYCs with
AVX-512 + VNNI + AVX512-BF16, and AMD EPYCs with AVX2 only. Two facts change results, not only
speed, and every module asks them here:

- **int8 dot products (VNNI).** Without VNNI, oneDNN's u8 x s8 convolutions multiply-add pairs of
  products into a saturating int16 (``vpmaddubsw``): 255 * 127 * 2 = 64,770 > 32,767, so 8-bit
  weights against 8-bit activations overflow and the output is wrong (an mbf's embeddings fell
  to cosine 0.92 of fp32 on an AVX2-only EPYC). 7-bit weights (|w| <= 63) cannot saturate
  (255 * 63 * 2 = 32,130): `int8_weight_range` picks them there.
- **native bf16** (AVX512-BF16 or AMX): autocast to bf16 is only faster with it.

``ONEDNN_MAX_CPU_ISA`` caps the instruction sets oneDNN uses below what the CPU has (the test
matrix in docs/testing.md runs the suite under AVX2 and AVX512_CORE caps), so it is honoured too.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

from marginface.errors import UserError

CPUINFO = "/proc/cpuinfo"

# AOTInductor's AOTI_CPU_ISA names -> /proc/cpuinfo flags
ISA_FLAGS = {"AVX2": "avx2", "AVX512": "avx512f", "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16",
             "AMX_TILE": "amx_tile", "AMX_BF16": "amx_bf16", "AMX_INT8": "amx_int8", "AMX_FP16": "amx_fp16"}
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# ONEDNN_MAX_CPU_ISA values below the first ISA with VNNI / with bf16 dot products
_CAPS_WITHOUT_VNNI = {"SSE41", "AVX", "AVX2", "AVX512_CORE"}
_CAPS_WITHOUT_BF16 = _CAPS_WITHOUT_VNNI | {"AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE_VNNI"}


@lru_cache(maxsize=4)
def cpu_flags(cpuinfo: str = CPUINFO) -> Optional[frozenset]:
    """The CPU's feature flags, or None where they cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def onednn_isa_cap() -> str:
    """``ONEDNN_MAX_CPU_ISA`` (or its old name ``DNNL_MAX_CPU_ISA``) upper-cased; "" when unset."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return "" if value.upper() == "ALL" else value.upper()


def missing_features(isa: str, cpuinfo: str = CPUINFO) -> list[str]:
    """The instruction sets of an AOTInductor package (``AOTI_CPU_ISA``, e.g. "AVX512 AVX512_VNNI")
    this CPU lacks; [] when unknown (no /proc/cpuinfo)."""
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return []
    return [name for name in isa.split() if name in ISA_FLAGS and ISA_FLAGS[name] not in flags]


def has_int8_dot_product(cpuinfo: str = CPUINFO) -> bool:
    """True where oneDNN runs u8 x s8 convolutions with VNNI (no int16 saturation). Unknown CPUs
    (no flags) count as lacking it: the 7-bit weights it then asks for are correct everywhere."""
    flags = cpu_flags(cpuinfo)
    if flags is None or onednn_isa_cap() in _CAPS_WITHOUT_VNNI:
        return False
    return any(f in flags for f in VNNI_FLAGS)


def has_fast_bf16(cpuinfo: str = CPUINFO) -> bool:
    """True where bf16 autocast pays off on the CPU: native bf16 dot products (AVX512-BF16 or AMX)."""
    if onednn_isa_cap() in _CAPS_WITHOUT_BF16:
        return False
    flags = cpu_flags(cpuinfo)
    if flags is None:  # not Linux: ask torch
        import torch

        checks = [getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None)]
        return any(bool(c()) for c in checks if c is not None)
    return any(f in flags for f in BF16_FLAGS)


def int8_weight_range(cpuinfo: str = CPUINFO) -> tuple[int, int]:
    """Symmetric int8 weight range that oneDNN computes exactly on this CPU: full 8 bits with
    VNNI, 7 bits (-64..63) without (see the module docstring)."""
    return (-128, 127) if has_int8_dot_product(cpuinfo) else (-64, 63)


# ---------------------------------------------------------------------------------------------- denormals
FLUSH_DENORMALS_ENV = "MARGINFACE_FLUSH_DENORMALS"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_flush_choice: Optional[bool] = None  # set by an explicit flush_denormals(True/False); wins over the env


def flush_denormals_wanted() -> bool:
    """Whether subnormal floats should be flushed: the last explicit `flush_denormals` argument,
    else ``MARGINFACE_FLUSH_DENORMALS`` (``0``/``false``/``no``/``off`` switch it off), else on."""
    if _flush_choice is not None:
        return _flush_choice
    value = os.environ.get(FLUSH_DENORMALS_ENV, "").strip().lower()
    if value in ("",) + _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UserError(f"{FLUSH_DENORMALS_ENV}={os.environ[FLUSH_DENORMALS_ENV]!r}: expected 1 or 0 (true/false, on/off)")


def flush_denormals(enabled: Optional[bool] = None) -> bool:
    """Flush subnormal floats to zero on the CPU (x86 FTZ + DAZ, via ``torch.set_flush_denormal``)
    and return whether flushing is now on (False where the CPU cannot, or where switched off).

    Why it is the default: a network's activations can shrink into subnormals (a freshly initialised
    mbf in eval mode does, layer by layer), and x86 CPUs compute on them 10-100x slower (micro-code
    assists): ``marginface bench --backbone mbf`` measured a 1.9 s batch-1 eager forward instead of
    55 ms. Values below 1.2e-38 (fp32) do not change an embedding. Every CPU path that runs a model
    calls this (training, evaluation, `load_model`, `FaceEmbedder`, bench) with ``enabled=None``: the
    configured default (`flush_denormals_wanted`). Passing True/False sets it for the process, and
    later ``None`` calls keep that choice. The setting is per process (torch's threads included)."""
    global _flush_choice
    import torch  # deferred: this module stays light (the CLI imports it before torch)

    if enabled is not None:
        _flush_choice = bool(enabled)
    want = flush_denormals_wanted()
    supported = torch.set_flush_denormal(want)
    return bool(want and supported)


def denormals_flushed() -> bool:
    """Whether the CPU flushes subnormal fp32 now (measured: a subnormal times one comes out as 0)."""
    import torch  # deferred: see flush_denormals

    return float((torch.full((4,), 1e-40) * 1.0)[0]) == 0.0


def isa_key(cpuinfo: str = CPUINFO) -> str:
    """What decides which compiled path is fastest and which packages run: the vector/matrix ISA
    flags of this CPU that oneDNN and Inductor use (``ISA_FLAGS`` plus ``avx_vnni``), sorted, and
    the ``ONEDNN_MAX_CPU_ISA`` cap when one is set; "unknown" without /proc/cpuinfo. Caches keyed by
    it (`deploy.autoprecision`) decide again on another CPU family."""
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return "unknown"
    wanted = set(ISA_FLAGS.values()) | {"avx_vnni", "avx512bw", "avx512vl", "fma"}
    key = " ".join(sorted(f for f in flags if f in wanted)) or "baseline"
    cap = onednn_isa_cap()
    return f"{key} cap={cap}" if cap else key
