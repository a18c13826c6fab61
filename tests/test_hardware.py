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


# ---------------------------------------------------------------------------------------------- denormals
@pytest.fixture
def flush_state(monkeypatch):
    """Each test starts with no explicit choice and the env unset; the process's FTZ/DAZ is put back."""
    torch = pytest.importorskip("torch")
    before = hardware.denormals_flushed()
    monkeypatch.setattr(hardware, "_flush_choice", None)
    monkeypatch.delenv(hardware.FLUSH_DENORMALS_ENV, raising=False)
    if not torch.set_flush_denormal(False):
        pytest.skip("torch.set_flush_denormal is unsupported on this CPU (no SSE3 FTZ/DAZ)")
    yield torch
    torch.set_flush_denormal(before)


def test_flush_denormals_is_on_by_default_and_flushes_a_subnormal(flush_state):
    torch = flush_state
    tiny = torch.full((8,), 1e-40)  # fp32 subnormal (smallest normal: 1.18e-38)
    assert float((tiny * 1.0)[0]) != 0.0  # not flushed yet
    assert hardware.flush_denormals() is True
    assert float((tiny * 1.0)[0]) == 0.0 and hardware.denormals_flushed()
    x = torch.full((1, 4, 8, 8), 1e-39)  # a conv (oneDNN, torch's threads) sees zeros too
    conv = torch.nn.Conv2d(4, 4, 3, bias=False)
    torch.nn.init.constant_(conv.weight, 0.5)
    with torch.no_grad():
        assert float(conv(x).abs().max()) == 0.0


@pytest.mark.parametrize("how", ["argument", "env"])
def test_flush_denormals_can_be_switched_off(flush_state, monkeypatch, how):
    torch = flush_state
    if how == "env":
        monkeypatch.setenv(hardware.FLUSH_DENORMALS_ENV, "0")
        assert hardware.flush_denormals() is False
    else:
        assert hardware.flush_denormals(False) is False
        assert hardware.flush_denormals() is False  # an explicit choice holds for later default calls
    assert float((torch.full((8,), 1e-40) * 1.0)[0]) != 0.0
    assert not hardware.denormals_flushed()
    assert hardware.flush_denormals(True) is True and hardware.denormals_flushed()


def test_a_bad_flush_setting_is_a_one_line_error(flush_state, monkeypatch):
    from marginface.errors import UserError

    monkeypatch.setenv(hardware.FLUSH_DENORMALS_ENV, "maybe")
    with pytest.raises(UserError, match="MARGINFACE_FLUSH_DENORMALS='maybe'"):
        hardware.flush_denormals()


def test_loading_and_embedding_flush_denormals(flush_state, tmp_path):
    """The CPU paths call it: evaluation's embedding (and through it eval/identify/embed/pipeline)."""
    import numpy as np

    from marginface.evaluate.runner import embed_views
    from marginface.models import build_backbone

    model = build_backbone("mbf", embedding_size=16, input_size=32, width_mult=0.25)
    assert not hardware.denormals_flushed()
    embed_views(model, np.zeros((1, 32, 32, 3), np.uint8), flip=False)
    assert hardware.denormals_flushed()


def test_the_isa_key_follows_flags_and_cap(tmp_path, monkeypatch):
    avx2 = hardware.isa_key(cpuinfo_with(tmp_path, "avx avx2 fma sse4_2"))
    (tmp_path / "amx").mkdir()
    amx = hardware.isa_key(cpuinfo_with(tmp_path / "amx", "avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8"))
    assert avx2 == "avx2 fma" and amx != avx2 and "amx_int8" in amx
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    capped = hardware.isa_key(str(tmp_path / "amx" / "cpuinfo"))
    assert capped == amx + " cap=AVX2"
    assert hardware.isa_key(str(tmp_path / "absent")) == "unknown"
