"""`export --format aoti --precision auto`: the package's precision is the one `choose_precision`
picks (int8 a candidate only with real calibration faces); no passing path is one error line."""
import cv2
import numpy as np
import pytest

import marginface.deploy.export as export
from marginface.cli import main
from marginface.deploy.autoprecision import EAGER, PrecisionChoice
from marginface.deploy.load import random_backbone
from marginface.errors import UserError


class Decided(Exception):
    pass


def _recording(seen, precision=None):
    def choose(model, calibration, *, precisions, **kw):
        seen.append((tuple(precisions), tuple(calibration.shape)))
        if precision is None:
            raise Decided  # stop before compiling: the candidates are what this test is about
        return PrecisionChoice(precision=precision, isa="test")
    return choose


def test_auto_offers_int8_only_with_calibration_faces(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(export, "choose_precision", _recording(seen))
    model = random_backbone("mbf", embedding_size=32, input_size=32, width_mult=0.25)
    with pytest.raises(Decided):
        export.export_compiled(model, tmp_path / "m.pt2", precision="auto")
    calib = tmp_path / "faces"
    calib.mkdir()
    for i in range(3):
        cv2.imwrite(str(calib / f"{i}.png"), np.full((32, 32, 3), 40 * i, np.uint8))
    with pytest.raises(Decided):
        export.export_compiled(model, tmp_path / "m.pt2", precision="auto", calib=calib)
    assert seen[0][0] == ("fp32", "bf16") and seen[0][1][1:] == (3, 32, 32)
    assert seen[1][0] == ("fp32", "bf16", "int8") and seen[1][1][0] == 3


def test_auto_with_no_passing_path_is_one_error_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "choose_precision", _recording([], EAGER))
    model = random_backbone("mbf", embedding_size=32, input_size=32, width_mult=0.25)
    with pytest.raises(UserError, match="no compiled path reproduced eager fp32"):
        export.export_compiled(model, tmp_path / "m.pt2", precision="auto")
    assert not (tmp_path / "m.pt2").exists()


def test_cli_takes_auto_for_aoti_only(tmp_path, capsys):
    rc = main(["export", "--backbone", "mbf", "--format", "onnx", "--precision", "auto", "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: --precision auto needs --format aoti; --format onnx does fp32, int8"]
