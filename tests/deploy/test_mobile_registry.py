"""The mobile-format plumbing (`marginface.deploy.mobile`): one registry read by export, load and
bench; the metadata sidecar; one-line errors for a missing package, a missing companion file and a
bad sidecar. Each format's own export/run tests live in tests/deploy/test_mobile_<format>.py."""

import numpy as np
import pytest

from marginface.deploy import mobile
from marginface.deploy.bench import EXTRA_RUNTIMES
from marginface.deploy.export import FORMATS
from marginface.deploy.load import load_model
from marginface.errors import UserError
from marginface.inference import KINDS


def test_every_mobile_format_is_exportable_loadable_and_benchable():
    for name, fmt in mobile.MOBILE_FORMATS.items():
        assert name in FORMATS and name in KINDS
        assert name in EXTRA_RUNTIMES
        for suffix in fmt.suffixes:
            assert mobile.format_of(f"model{suffix.upper()}") is fmt
    assert mobile.format_of("model.onnx") is None


def test_sidecar_round_trip_and_bad_sidecar(tmp_path):
    model = tmp_path / "m.tflite"
    written = mobile.write_sidecar(model, {"normalize": "arcface", "input_size": "112,96"})
    assert written == tmp_path / "m.tflite.json"
    assert mobile.read_sidecar(model) == {"input_size": "112,96", "normalize": "arcface"}
    assert mobile.read_sidecar(tmp_path / "other.tflite") == {}
    written.write_text("[1, 2]")
    with pytest.raises(UserError, match="m.tflite.json: not a marginface metadata file"):
        mobile.read_sidecar(model)


def test_missing_package_names_the_extra(monkeypatch):
    fmt = mobile.MobileFormat("demo", (".demo",), "nonexistent_module", "demo-extra",
                              runtime=("surely_not_an_installed_package_xyz",), converter=())
    with pytest.raises(UserError, match=r"pip install 'marginface\[demo-extra\]'"):
        fmt.load_module("runtime")


def test_companion_file_must_sit_beside_the_model(tmp_path):
    param = tmp_path / "mbf.param"
    param.write_text("7767517\n")
    with pytest.raises(UserError, match=r"mbf.param: its \.bin file mbf\.bin is missing"):
        load_model(param)


class _Doubler(mobile.RuntimeEmbedder):
    kind = "tflite"

    def __init__(self, path, normalize=None):
        self._set_info(path, normalize, embedding_size=6)

    def _run(self, x):
        assert len(x) == 1  # fixed batch of 1: the base class loops
        return x.reshape(1, -1)[:, :6] * 2


def test_runtime_embedder_reads_the_sidecar_and_loops_over_a_fixed_batch(tmp_path):
    path = tmp_path / "m.tflite"
    mobile.write_sidecar(path, {"normalize": "imagenet", "input_size": "4,4", "threshold": "0.3",
                                "threshold_source": "lfw", "backbone": "mbf"})
    emb = _Doubler(path)
    assert (emb.info.input_size, emb.info.normalize, emb.info.threshold, emb.info.kind) == \
        ((4, 4), "imagenet", 0.3, "tflite")
    x = np.arange(3 * 3 * 16, dtype=np.float32).reshape(3, 3, 4, 4)
    out = emb(x).numpy()
    assert out.shape == (3, 6) and np.array_equal(out, x.reshape(3, -1)[:, :6] * 2)
    with pytest.raises(ValueError, match="expected N×3×4×4"):
        emb.run_numpy(np.zeros((1, 3, 5, 5), np.float32))
    mobile.write_sidecar(path, {"normalize": "bgr-raw"})
    with pytest.raises(UserError, match="normalisation 'bgr-raw'"):
        _Doubler(path)
