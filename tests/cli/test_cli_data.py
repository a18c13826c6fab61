"""`marginface data ...`: synth, inspect, convert, align through the CLI contract (JSON, exit codes)."""
import json
import os
import subprocess
import sys

import pytest
from shared_data import shared_data  # noqa: E402  (tests/shared_data.py)

SHARED = shared_data()  # tests/shared_data.py: $MARGINFACE_SHARED_DATA or ../shared/data


def cli(*args):
    res = subprocess.run([sys.executable, "-m", "marginface", *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return res


@pytest.mark.parametrize("fmt, expected_format", [("folder", "folder"), ("rec", "recordio")])
def test_synth_then_inspect(tmp_path, fmt, expected_format):
    out = tmp_path / fmt
    res = cli("data", "synth", str(out), "--identities", "4", "--images", "3", "--size", "64", "--format", fmt, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"path": str(out), "format": fmt, "identities": 4, "images": 12}
    res = cli("data", "inspect", str(out), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert (info["format"], info["identities"], info["images"], info["unreadable"]) == (expected_format, 4, 12, [])


def test_convert_folder_to_rec_keeps_labels(tmp_path):
    assert cli("data", "synth", str(tmp_path / "f"), "--identities", "3", "--images", "2", "--size", "32").returncode == 0
    res = cli("data", "convert", str(tmp_path / "f"), str(tmp_path / "r"), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(cli("data", "inspect", str(tmp_path / "r"), "--json").stdout)
    assert (info["identities"], info["images"]) == (3, 6)


def test_bad_paths_give_one_error_line(tmp_path):
    res = cli("data", "inspect", str(tmp_path / "nope"), "--json")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1 and "nope" in res.stderr


def test_inspect_verification_bin():
    path = SHARED / "verification" / "lfw_head20.bin"
    if not path.is_file():
        pytest.skip(f"shared data absent: {path}")
    info = json.loads(cli("data", "inspect", str(path), "--json").stdout)
    assert info["pairs"] == 10 and info["unreadable"] == []
