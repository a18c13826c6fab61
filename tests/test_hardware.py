"""marginface.hardware: CPU features as oneDNN will use them (flags + ONEDNN_MAX_CPU_ISA cap)."""
import pytest

from marginface import hardware


def cpuinfo_with(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: X\nflags\t\t: fpu sse {flags}\n\nprocessor\t: 1\nflags\t\t: fpu sse {flags}\n")
    return str(path)


@pytest.fixture(autouse=True)
def no_isa_cap(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


def test_missing_features_of_a_package_are_named(tmp_path):
    cpuinfo = cpuinfo_with(tmp_path, "avx avx2 avx512f avx512bw")
    assert hardware.missing_features("AVX512 AVX512_VNNI", cpuinfo) == ["AVX512_VNNI"]
    assert hardware.missing_features("AVX2", cpuinfo) == []
    assert hardware.missing_features("AVX512 AMX_TILE", str(tmp_path / "absent")) == []  # unknown: no refusal


@pytest.mark.parametrize("flags, vnni, bf16", [
    ("avx avx2 fma", False, False),                                   # AMD EPYC without AVX-512
    ("avx2 avx512f avx512bw", False, False),                          # Skylake-SP: AVX-512, no VNNI
    ("avx2 avx512f avx512_vnni avx512_bf16", True, True),             # Zen 4/5
    ("avx2 avx_vnni", True, False),                                   # Alder Lake: VEX VNNI only
    ("avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8", True, True),  # Sapphire Rapids
])
def test_int8_dot_product_and_bf16_from_the_flags(tmp_path, flags, vnni, bf16):
    cpuinfo = cpuinfo_with(tmp_path, flags)
    assert hardware.has_int8_dot_product(cpuinfo) is vnni
    assert hardware.has_fast_bf16(cpuinfo) is bf16
    assert hardware.int8_weight_range(cpuinfo) == ((-128, 127) if vnni else (-64, 63))


@pytest.mark.parametrize("cap, vnni, bf16", [("AVX2", False, False), ("avx512_core", False, False),
                                             ("AVX512_CORE_VNNI", True, False), ("AVX512_CORE_AMX", True, True),
                                             ("ALL", True, True)])
def test_the_onednn_isa_cap_is_honoured(tmp_path, monkeypatch, cap, vnni, bf16):
    """Under ONEDNN_MAX_CPU_ISA=AVX2 an AMX machine's oneDNN runs the saturating AVX2 int8 kernels."""
    cpuinfo = cpuinfo_with(tmp_path, "avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert hardware.has_int8_dot_product(cpuinfo) is vnni
    assert hardware.has_fast_bf16(cpuinfo) is bf16


def test_unknown_cpu_gets_the_weights_that_are_exact_everywhere(tmp_path):
    assert hardware.int8_weight_range(str(tmp_path / "absent")) == (-64, 63)
