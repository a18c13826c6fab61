"""--precision auto (marginface.deploy.autoprecision): checked paths only, cached per CPU, atomic cache."""
import importlib.util
import json

import pytest
import torch

from marginface import hardware
from marginface.deploy import autoprecision
from marginface.deploy.autoprecision import ACCURACY_BOUNDS, EAGER, auto_embedder, choose_precision, default_cache_path
from marginface.deploy.compiled import CompiledEmbedder
from marginface.deploy.load import trained_looking
from marginface.errors import UserError
from marginface.io import atomic
from marginface.models import build_backbone

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao not installed (pip install 'marginface[int8]')")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return trained_looking(build_backbone("mbf", embedding_size=32, input_size=32, width_mult=0.25))


@pytest.fixture(scope="module")
def calibration():
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def compiles(monkeypatch):
    """Counts real compilations (CompiledEmbedder._build calls), per precision."""
    counted = []
    real = CompiledEmbedder._build

    def counting(self, first):
        counted.append(self.precision)
        return real(self, first)
    monkeypatch.setattr(CompiledEmbedder, "_build", counting)
    return counted


class Broken:
    """A path that is fastest (no computation at all) and wrong: it must never be picked."""

    def __init__(self, model, precision, **_):
        self.precision = precision
        self.out = torch.randn(64, model.embedding_size, generator=torch.Generator().manual_seed(5))

    def __call__(self, x):
        return self.out[: len(x)]


class Exact:
    """A path that computes eager fp32 (accurate, nothing to compile): keeps the cache tests fast."""

    def __init__(self, model, precision, **_):
        self.model, self.precision = model, precision

    def __call__(self, x):
        with torch.no_grad():
            return self.model(x)


def with_broken(broken_precision, built=None):
    """A builder: ``broken_precision`` is `Broken`, the others `Exact`; ``built`` records each build."""
    def build(model, precision, **kw):
        if built is not None:
            built.append(precision)
        return (Broken if precision == broken_precision else Exact)(model, precision)
    return build


def test_a_path_below_its_accuracy_bound_is_never_picked(model, calibration):
    built = []
    choice = choose_precision(model, calibration, precisions=("fp32", "bf16"), build=with_broken("bf16", built),
                              rounds=2, runs=3)
    bf16 = choice.paths["bf16"]
    assert bf16.status == "inaccurate" and bf16.min_cosine < ACCURACY_BOUNDS["bf16"] and bf16.latency_ms is None
    assert choice.paths["fp32"].status == "ok" and choice.paths["fp32"].min_cosine > ACCURACY_BOUNDS["fp32"]
    assert choice.precision == "fp32" and built == ["fp32", "bf16"]
    assert any("FAILED the bound" in line for line in choice.lines())
    # nothing passes: eager fp32, not a wrong compiled path
    choice = choose_precision(model, calibration, precisions=("bf16",), build=with_broken("bf16"), rounds=1, runs=2)
    assert choice.precision == EAGER and choice.eager_ms > 0
    embedder, _ = auto_embedder(model, calibration, precisions=("bf16",), build=with_broken("bf16"), rounds=1, runs=2)
    assert embedder is model


def test_the_choice_is_cached_per_isa_and_reused_without_compiling(model, calibration, tmp_path, monkeypatch):
    """Counts builds of a path (each would be one compile): a cached choice builds nothing."""
    cache = tmp_path / "best.precision.json"
    compiles = []
    build = with_broken("none", compiles)
    monkeypatch.setattr(hardware, "isa_key", lambda: "avx2 fma")
    first = choose_precision(model, calibration, cache_path=cache, precisions=("fp32",), rounds=1, runs=2, build=build)
    assert compiles == ["fp32"] and not first.cached and first.precision == "fp32"
    data = json.loads(cache.read_text())
    assert list(data["entries"]) == ["avx2 fma"] and data["entries"]["avx2 fma"]["precision"] == "fp32"

    again = choose_precision(model, calibration, cache_path=cache, precisions=("fp32",), build=build)
    assert again.cached and again.precision == "fp32" and compiles == ["fp32"]  # no compile
    assert again.paths["fp32"].latency_ms == first.paths["fp32"].latency_ms

    # another CPU family: another key, decided again; both entries kept
    monkeypatch.setattr(hardware, "isa_key", lambda: "amx_bf16 amx_int8 amx_tile avx2 avx512f")
    other = choose_precision(model, calibration, cache_path=cache, precisions=("fp32",), rounds=1, runs=2, build=build)
    assert not other.cached and compiles == ["fp32", "fp32"]
    assert set(json.loads(cache.read_text())["entries"]) == {"avx2 fma", "amx_bf16 amx_int8 amx_tile avx2 avx512f"}

    # other weights: decided again
    changed = trained_looking(build_backbone("mbf", embedding_size=32, input_size=32, width_mult=0.25), seed=3)
    assert not choose_precision(changed, calibration, cache_path=cache, precisions=("fp32",), rounds=1, runs=2, build=build).cached
    assert compiles == ["fp32"] * 3


def test_the_cache_is_written_atomically(model, calibration, tmp_path, monkeypatch):
    """Through marginface.io.atomic: a failed write leaves the previous file whole and no temp file."""
    cache = tmp_path / "m.precision.json"
    cache.write_text('{"format": 1, "entries": {"old cpu": {"precision": "int8"}}}')
    before = cache.read_text()
    written = []
    real = autoprecision.atomic_write_json

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    def spy(path, obj, **kw):
        written.append(path)
        with monkeypatch.context() as m:  # the rename fails: the disk filled up
            m.setattr(atomic.os, "replace", full_disk)
            return real(path, obj, **kw)
    monkeypatch.setattr(autoprecision, "atomic_write_json", spy)
    choice = choose_precision(model, calibration, cache_path=cache, precisions=("fp32",), build=with_broken("none"),
                              rounds=1, runs=2)
    assert written == [cache] and choice.precision == "fp32" and choice.cache_path is None
    assert cache.read_text() == before and [p.name for p in tmp_path.iterdir()] == [cache.name]
    assert autoprecision.atomic_write_json is spy and atomic.atomic_write_json is real


def test_bad_candidates_and_cache_location(model, calibration, tmp_path):
    with pytest.raises(UserError, match="candidates must be among"):
        choose_precision(model, calibration, precisions=("fp16",))
    with pytest.raises(UserError, match="N×3×H×W"):
        choose_precision(model, calibration[0], precisions=("fp32",))
    assert default_cache_path(tmp_path / "run" / "best.pt") == tmp_path / "run" / "best.precision.json"
    assert default_cache_path(tmp_path / "m.pt2") == tmp_path / "m.precision.json"
    assert default_cache_path(model) is None  # no file: nothing cached


@needs_torchao
def test_auto_checks_and_times_every_path(model, calibration, compiles, tmp_path):
    """The real thing on this CPU: all three paths built and checked, the fastest checked one taken."""
    embedder, choice = auto_embedder(model, calibration, batch_size=1, cache_path=tmp_path / "m.precision.json",
                                     rounds=2, runs=3)
    assert sorted(compiles) == ["bf16", "fp32", "int8"]
    ok = {p: r for p, r in choice.paths.items() if r.status == "ok"}
    assert choice.precision in ok and all(r.min_cosine >= ACCURACY_BOUNDS[p] for p, r in ok.items())
    assert choice.paths[choice.precision].best_ms == min(r.best_ms for r in ok.values())
    assert all(r.best_ms <= r.latency_ms for r in ok.values())
    assert embedder is not model and embedder.precision == choice.precision and len(compiles) == 3  # reused
    out = embedder(calibration)
    assert out.shape == (8, 32)
    again = choose_precision(model, calibration, cache_path=tmp_path / "m.precision.json")
    assert again.cached and again.precision == choice.precision and len(compiles) == 3  # nothing compiled
