"""The hostile-input corpus: every case is a small function that writes its files at test time.

A case's ``build(dir)`` writes what it needs under ``dir`` and returns a spec:

* ``argv``: a ``marginface`` command line (run in-process by ``worker.py``), or
* ``call``: ``["module:function", [args]]`` (optionally ``+ ["method", [args]]``) for a reader
  that no command reaches cheaply; ``UserError`` becomes exit 2 and an ``error:`` line, as in the CLI;
* ``names``: strings the one ``error:`` line must contain (the file name, a line number, a key);
* ``outputs``: paths that must not exist afterwards (nothing half-written);
* ``accept``: True when the right answer is to finish normally (exit 0), e.g. a FIFO inside an
  image folder is not listed as an image; the case then checks only that nothing hangs;
* ``json``: True when stdout must be one valid JSON object (``--json`` with NaN in the data).

Add a case by appending ``Case("name", builder)`` to ``CASES``; ``tests/test_hostile_inputs.py``
runs them all, ``python -m tests.hostile.runner`` prints the totals.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np


def shared_data() -> Path:
    env = os.environ.get("MARGINFACE_SHARED_DATA")
    for cand in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[3] / "shared" / "data",
                                                 Path("/work/shared/data")]:
        if cand.is_dir():
            return cand
    return Path("/nonexistent/shared/data")


SHARED = shared_data()
ONNX_MODEL = SHARED / "weights" / "mobilefacenet_onnx" / "MobileFaceNet.onnx"
MTCNN = SHARED / "weights" / "mtcnn"
PHOTO = SHARED / "photos" / "deepface" / "img1.jpg"


@dataclass
class Case:
    name: str
    build: Callable[[Path], dict]
    needs_shared: bool = False


# ------------------------------------------------------------------------------- image bytes
def jpeg_bytes(h: int = 32, w: int = 32, seed: int = 0) -> bytes:
    image = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int, color_type: int = 2, rows: int = 2) -> bytes:
    """A PNG whose IHDR claims ``width``x``height`` but whose data holds only ``rows`` rows."""
    channels = {0: 1, 2: 3, 6: 4}[color_type]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    raw = zlib.compress((b"\0" + b"\0" * (width * channels)) * rows)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", raw) + _chunk(b"IEND", b"")


@functools.lru_cache(maxsize=1)
def png_complete_huge(side: int = 20000) -> bytes:
    """A complete, valid ``side``x``side`` gray PNG of zeros (~400 KB on disk, 400 MB decoded)."""
    row = b"\0" * (side + 1)
    # one row deflated after a full flush is byte-aligned and independent of what came before,
    # so repeating its bytes is a valid stream: no need to compress 400 MB at test time
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = raw.compress(row) + raw.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(side):
        adler = zlib.adler32(row, adler)
    body = b"\x78\xda" + block * side + b"\x03\x00" + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def jpeg_claiming(height: int, width: int) -> bytes:
    """A small real JPEG whose SOF header is patched to claim ``height``x``width``."""
    data = bytearray(jpeg_bytes(16, 16))
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def gif_claiming(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b",\0\0\0\0\x01\0\x01\0\0\x02\x02D\x01\0;"


def bmp_claiming(width: int, height: int) -> bytes:
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 12, 0, 0, 54) + dib + b"\0" * 12


def tiff_claiming(width: int, height: int) -> bytes:
    tags = struct.pack("<HHII", 256, 4, 1, width) + struct.pack("<HHII", 257, 4, 1, height)
    return b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 2) + tags + struct.pack("<I", 0)


# ------------------------------------------------------------------------------- image cases
def _verify_argv(bad: Path) -> list:
    return ["verify", "--model", str(ONNX_MODEL), "--detector-weights", str(MTCNN), str(bad), str(PHOTO), "--json"]


def _bad_image(make: Callable[[Path], Path], via: str):
    """A case that gives the hostile image ``make(dir)`` to ``verify`` or ``embed``."""
    def build(d: Path) -> dict:
        if via == "verify":
            bad = make(d)
            return {"argv": _verify_argv(bad), "names": [bad.name]}
        folder = d / "images"
        folder.mkdir()
        (folder / "a_good.jpg").write_bytes(jpeg_bytes(112, 112))
        bad = make(folder)
        out = d / "out" / "feats.npy"
        out.parent.mkdir()
        argv = ["embed", "--model", str(ONNX_MODEL), "--images", str(folder), "--out", str(out), "--json"]
        from marginface.data.sources import IMAGE_EXTENSIONS

        if (not bad.is_file() and not bad.is_dir()) or bad.suffix not in IMAGE_EXTENSIONS:
            return {"argv": argv, "accept": True}  # FIFOs, devices, .gif: not listed as images, skipped
        return {"argv": argv, "names": [bad.name], "outputs": [out, out.with_suffix(".txt")]}
    return build


def _write(name: str, data: bytes | Callable[[], bytes]):
    def make(d: Path) -> Path:
        p = d / name
        p.write_bytes(data() if callable(data) else data)
        return p
    return make


def _fifo(d: Path) -> Path:
    p = d / "fifo.jpg"
    os.mkfifo(p)
    return p


def _device(d: Path) -> Path:
    p = d / "zero.jpg"
    p.symlink_to("/dev/zero")
    return p


def _folder_named_jpg(d: Path) -> Path:
    p = d / "folder.jpg"
    p.mkdir()
    (p / "x").write_text("x")
    return p


IMAGE_KINDS = {
    "png_20000x20000": _write("huge.png", png_complete_huge),
    "png_header_100000x100000": _write("claims.png", png_header_only(100000, 100000)),
    "png_header_65535x1000": _write("wide.png", png_header_only(65535, 1000, rows=1)),
    "jpeg_header_65500x65500": _write("claims.jpg", jpeg_claiming(65500, 65500)),
    "jpeg_65500_lines": _write("tall.jpg", jpeg_claiming(65500, 16)),
    "gif_header_65535x65535": _write("claims.gif", gif_claiming(65535, 65535)),
    "bmp_header_50000x50000": _write("claims.bmp", bmp_claiming(50000, -50000)),
    "tiff_header_100000x100000": _write("claims.tiff", tiff_claiming(100000, 100000)),
    "png_header_0x0": _write("empty_size.png", png_header_only(0, 0, rows=0)),
    "fifo": _fifo,
    "dev_zero": _device,
    "truncated_jpeg": _write("cut.jpg", jpeg_bytes(64, 64)[:200]),
    "text_as_jpeg": _write("notes.jpg", b"hello, not an image\n"),
    "empty_png": _write("empty.png", b""),
}


# ------------------------------------------------------------------------------- text files
LATIN1 = "Jos\xe9 M\xfcller".encode("latin-1")


def _list_file(lines: bytes, images: int = 2):
    def build(d: Path) -> dict:
        (d / "images").mkdir()
        for i in range(images):
            (d / "images" / f"{i}.jpg").write_bytes(jpeg_bytes(32, 32, i))
        p = d / "label.txt"
        p.write_bytes(lines)
        return {"argv": ["data", "inspect", str(p)], "names": ["label.txt"]}
    return build


def _vggface2(csv_body: bytes, names=("loose_landmark_train.csv",)):
    def build(d: Path) -> dict:
        (d / "train" / "n000001").mkdir(parents=True)
        (d / "train" / "n000001" / "0001_01.jpg").write_bytes(jpeg_bytes(64, 64))
        (d / "train_list.txt").write_text("n000001/0001_01.jpg\n")
        (d / "bb_landmark").mkdir()
        (d / "bb_landmark" / "loose_landmark_train.csv").write_bytes(csv_body)
        return {"argv": ["data", "inspect", str(d)], "names": list(names)}
    return build


def _lfw_dir(pairs: bytes, landmarks: bytes | None = None):
    def build(d: Path) -> dict:
        for name in ("Alice", "Bob"):
            (d / "lfw" / name).mkdir(parents=True)
            for k in (1, 2):
                (d / "lfw" / name / f"{name}_{k:04d}.jpg").write_bytes(jpeg_bytes(112, 112, k))
        (d / "lfw" / "pairs.txt").write_bytes(pairs)
        if landmarks is None:
            return {"argv": ["data", "inspect", str(d / "lfw")], "names": ["pairs.txt"]}
        (d / "lfw" / "landmarks.txt").write_bytes(landmarks)
        return {"call": ["marginface.data.verification:read_landmarks_file", [str(d / "lfw" / "landmarks.txt")]],
                "names": ["landmarks.txt", "1"]}
    return build


def _pairs_csv(body: bytes, via: str = "inspect"):
    def build(d: Path) -> dict:
        for name in ("a.jpg", "b.jpg"):
            (d / name).write_bytes(jpeg_bytes(112, 112))
        p = d / "pairs.csv"
        p.write_bytes(body)
        if via == "inspect":
            return {"argv": ["data", "inspect", str(p)], "names": ["pairs.csv"]}
        return {"argv": ["verify", "--model", str(ONNX_MODEL), "--detector-weights", str(MTCNN), "--pairs", str(p)],
                "names": ["pairs.csv"]}
    return build


def _config(body: bytes, extra=(), names=("bad.yaml",), outputs=()):
    def build(d: Path) -> dict:
        p = d / "bad.yaml"
        p.write_bytes(body)
        return {"argv": ["train", "--config", str(p), "--dry-run", *extra], "names": list(names),
                "outputs": [d / o for o in outputs]}
    return build


def _override(*sets: str, names=()):
    def build(d: Path) -> dict:
        return {"argv": ["train", "--dry-run", "--out", str(d / "run"), "--set", *sets], "names": list(names),
                "outputs": [d / "run"]}
    return build


def _alias_bomb() -> bytes:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("data:\n  val: *a9")  # 9**10 strings once anything walks the list
    return ("\n".join(lines) + "\n").encode()


# ------------------------------------------------------------------------------- RecordIO
def _pack(labels, header_end=None, image: bytes | None = None, property_classes=None):
    """A RecordIO pack whose image records carry ``labels`` (floats, written raw)."""
    def build(d: Path) -> dict:
        from marginface.data.recordio import RecordIOWriter, pack_record

        rec, idx = d / "train.rec", d / "train.idx"
        with RecordIOWriter(rec, idx) as w:
            n = len(labels)
            w.write(0, pack_record([float(header_end if header_end is not None else n + 1), float(n + 1)], b""))
            for k, label in enumerate(labels, 1):
                w.write(k, pack_record(float(label), image or jpeg_bytes(16, 16, k), record_id=k))
        if property_classes is not None:
            (d / "property").write_text(f"{property_classes},112,112\n")
        return {"argv": ["data", "inspect", str(rec)], "names": ["train.rec"]}
    return build


def _pack_idx_key_beyond_int64(d: Path) -> dict:
    _pack([0.0, 1.0])(d)
    (d / "train.idx").write_text((d / "train.idx").read_text() + "99999999999999999999999\t0\n")
    return {"argv": ["data", "inspect", str(d / "train.rec")], "names": ["train.idx", ":4"]}


def _pack_image_read(image: bytes):
    def build(d: Path) -> dict:
        spec = _pack([0.0, 1.0], image=image)(d)
        return {"call": ["marginface.data.recordio:RecordIOSource", [str(d / "train.rec")], "read", [0]],
                "names": ["train.rec", "record 1"]}
    return build


# ------------------------------------------------------------------------------- IJB
def _ijb(template: str):
    def build(d: Path) -> dict:
        meta = d / "meta"
        meta.mkdir()
        (meta / "ijbc_face_tid_mid.txt").write_text(f"1.jpg {template} 1\n2.jpg 2 2\n")
        (meta / "ijbc_template_pair_label.txt").write_text(f"{template} 2 1\n")
        (meta / "ijbc_name_5pts_score.txt").write_text(
            "".join(f"{n}.jpg " + " ".join(["50"] * 10) + " 0.9\n" for n in (1, 2)))
        return {"call": ["marginface.evaluate.ijb:read_ijb", [str(d)]], "names": ["ijbc_face_tid_mid.txt"]}
    return build


# ------------------------------------------------------------------------------- reports
def _compare(body: str, accept: bool = False):
    def build(d: Path) -> dict:
        (d / "a").mkdir()
        (d / "b").mkdir()
        good = {"eval": {"lfw": {"accuracy": 0.9}}}
        (d / "a" / "report.json").write_text(body)
        (d / "b" / "report.json").write_text(json.dumps(good))
        argv = ["eval", "--compare", str(d / "a"), str(d / "b")] + (["--json"] if accept else [])
        return {"argv": argv, "names": ["report.json"], "accept": accept, "json": accept}
    return build


# ------------------------------------------------------------------------------- models
def _nan_checkpoint(d: Path) -> dict:
    import torch

    from marginface.config import Config, to_dict
    from marginface.train.setup import build_model

    cfg = Config()
    model = build_model(cfg.model)
    state = model.state_dict()
    first = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[first] = state[first].clone()
    state[first].view(-1)[0] = float("nan")
    ckpt = d / "nan.pt"
    torch.save({"model": state, "config": to_dict(cfg)}, ckpt)
    out = d / "out.onnx"
    return {"argv": ["export", str(ckpt), "--out", str(out)], "names": ["nan.pt"], "outputs": [out]}


def _onnx_output(dims):
    def build(d: Path) -> dict:
        import onnx
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 112, 112])
        y = helper.make_tensor_value_info("emb", TensorProto.FLOAT, dims)
        node = helper.make_node("GlobalAveragePool", ["input"], ["pooled"])
        flat = helper.make_node("Flatten", ["pooled"], ["emb"])
        graph = helper.make_graph([node, flat], "g", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        p = d / "odd.onnx"
        onnx.save(model, str(p))
        out = d / "f.npy"
        (d / "imgs").mkdir()
        (d / "imgs" / "a.jpg").write_bytes(jpeg_bytes(112, 112))
        return {"argv": ["embed", "--model", str(p), "--images", str(d / "imgs"), "--out", str(out), "--json"],
                "names": ["odd.onnx"], "outputs": [out]}
    return build


# ------------------------------------------------------------------------------- features / archives
def _identify_with_distractors(make_feats: Callable[[Path], Path]):
    def build(d: Path) -> dict:
        for role in ("gallery", "probes"):
            for person, seed in (("ann", 1), ("bob", 2)):
                (d / role / person).mkdir(parents=True)
                (d / role / person / "1.jpg").write_bytes(jpeg_bytes(112, 112, seed))
        feats = make_feats(d)
        return {"argv": ["identify", "--model", str(ONNX_MODEL), "--gallery", str(d / "gallery"),
                         "--probes", str(d / "probes"), "--distractors", str(feats), "--json"],
                "names": [feats.name]}
    return build


def _nan_feats(d: Path) -> Path:
    feats = np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32)
    feats[2, 5] = np.nan
    np.save(d / "feats.npy", feats)
    return d / "feats.npy"


def _npy_bomb_header(d: Path) -> Path:
    """A .npy whose header claims 10^12 x 128 floats in a 200-byte file."""
    p = d / "claims.npy"
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 128), }"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    p.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64)
    return p


def _npz_bomb(d: Path) -> dict:
    """A zip-bomb .npz: one member that inflates to 256 MiB of zeros from ~250 KB (1000x)."""
    p = d / "bomb.npz"
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (65536, 1024), }"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("embeddings.npy", "w", force_zip64=True) as f:
            f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
            chunk = b"\0" * (1 << 24)
            for _ in range(16):
                f.write(chunk)
    return {"call": ["marginface.data.arrays:load_npz", [str(p)]], "names": ["bomb.npz"]}


def _bin_bytearray_bomb(d: Path) -> dict:
    """A 35-byte verification .bin whose pickle calls bytearray(2**31)."""
    p = d / "bomb.bin"
    # ((bytearray(2**33),), [True]): 8 GiB asked for by 35 bytes
    body = b"\x80\x02c__builtin__\nbytearray\n\x8a\x05\x00\x00\x00\x00\x02\x85R\x85]\x88a\x86."
    p.write_bytes(body)
    return {"argv": ["data", "inspect", str(p)], "names": ["bomb.bin"]}


def _special_as(name: str, kind: str):
    """A FIFO or ``/dev/zero`` given where a text file or a .bin is expected (``data inspect``)."""
    def build(d: Path) -> dict:
        p = d / name
        os.mkfifo(p) if kind == "fifo" else p.symlink_to("/dev/zero")
        return {"argv": ["data", "inspect", str(p)], "names": [name]}
    return build


def _bin_with_image(image: bytes, name: str = "huge_in.bin"):
    def build(d: Path) -> dict:
        p = d / name
        p.write_bytes(pickle.dumps(([np.frombuffer(image, np.uint8)] * 2, [True]), protocol=2))
        return {"argv": ["data", "inspect", str(p)], "names": [name]}
    return build


# ------------------------------------------------------------------------------- the corpus
CASES: list[Case] = []
for _kind, _make in IMAGE_KINDS.items():
    CASES.append(Case(f"verify_{_kind}", _bad_image(_make, "verify"), needs_shared=True))
    CASES.append(Case(f"embed_{_kind}", _bad_image(_make, "embed"), needs_shared=True))

CASES += [
    # a valid 16-pixel-wide strip: under the pixel limit, but the detector's padded retry was 8 GB
    Case("verify_jpeg_strip_60000x16", _bad_image(_write("strip.jpg", lambda: jpeg_bytes(60000, 16)), "verify"),
         needs_shared=True),
    Case("bin_png_header_100000x100000", _bin_with_image(png_header_only(100000, 100000))),
    Case("bin_jpeg_header_65500x65500", _bin_with_image(jpeg_claiming(65500, 65500))),
    Case("bin_bytearray_bomb", _bin_bytearray_bomb),
    Case("bin_is_fifo", _special_as("pairs.bin", "fifo")),
    Case("bin_is_dev_zero", _special_as("pairs.bin", "zero")),
    Case("pairs_csv_is_fifo", _special_as("pairs.csv", "fifo")),
    Case("pairs_txt_is_dev_zero", _special_as("pairs.txt", "zero")),
    Case("rec_png_header_100000x100000", _pack_image_read(png_header_only(100000, 100000))),
    # text that is not UTF-8, CSV fields beyond the csv module's limit, NUL bytes
    Case("list_latin1", _list_file(b"images/0.jpg\t0\nimages/" + LATIN1 + b".jpg\t1\n")),
    Case("list_label_1e12", _list_file(b"images/0.jpg\t0\nimages/1.jpg\t1000000000000\n")),
    Case("list_label_2e9", _list_file(b"images/0.jpg\t0\nimages/1.jpg\t2000000000\n")),
    Case("list_label_nan", _list_file(b"images/0.jpg\t0\nimages/1.jpg\tnan\n")),
    Case("vggface2_csv_latin1", _vggface2(b"NAME_ID,P1X\n" + LATIN1 + b",1\n")),
    Case("vggface2_csv_huge_field", _vggface2(b"NAME_ID,P1X\n" + b"n" * 200_000 + b",1\n")),
    Case("vggface2_csv_nul", _vggface2(b"NAME_ID,P1X,P1Y,P2X,P2Y,P3X,P3Y,P4X,P4Y,P5X,P5Y\n"
                                       b"n000001/0001_01,1,2,3,4,5,6,7,\x00,9,10\n")),
    Case("lfw_pairs_latin1", _lfw_dir(b"1 1\n" + LATIN1 + b" 1 2\n")),
    Case("lfw_landmarks_latin1", _lfw_dir(b"1 1\nAlice 1 2\n", landmarks=LATIN1 + b" 1 2 3 4 5 6 7 8 9 10\n")),
    Case("pairs_csv_latin1", _pairs_csv(b"file_x,file_y,Decision\n" + LATIN1 + b".jpg,b.jpg,Yes\n")),
    Case("pairs_csv_huge_field", _pairs_csv(b"file_x,file_y,Decision\n" + b"a" * 200_000 + b",b.jpg,Yes\n")),
    Case("pairs_csv_nul", _pairs_csv(b"file_x,file_y,Decision\na.jpg,b\x00.jpg,Yes\n")),
    Case("verify_pairs_csv_latin1", _pairs_csv(b"file_x,file_y,Decision\n" + LATIN1 + b".jpg,b.jpg,Yes\n",
                                               via="verify"), needs_shared=True),
    Case("verify_pairs_csv_huge_field", _pairs_csv(b"file_x,file_y,Decision\n" + b"a" * 200_000 + b",b.jpg,Yes\n",
                                                   via="verify"), needs_shared=True),
    Case("config_latin1", _config(b"name: " + LATIN1 + b"\n")),
    # numbers from files
    Case("rec_label_nan", _pack([0.0, float("nan")])),
    Case("rec_label_inf", _pack([0.0, float("inf")])),
    Case("rec_label_negative", _pack([0.0, -3.0])),
    Case("rec_label_1e12", _pack([0.0, 1e12])),
    Case("rec_label_2e9", _pack([0.0, 2e9])),
    Case("rec_header_1e12_records", _pack([0.0, 1.0], header_end=1e12)),
    Case("rec_idx_key_beyond_int64", _pack_idx_key_beyond_int64),
    Case("rec_property_1e12_classes", _pack([0.0, 1.0], property_classes=10**12)),
    Case("ijb_template_beyond_int64", _ijb("99999999999999999999999")),
    # configs
    Case("config_alias_bomb", _config(_alias_bomb())),
    Case("config_nested_50k", _config(b"model: " + b"[" * 50_000 + b"]" * 50_000 + b"\n")),
    Case("config_embedding_2e9", _config(b"model:\n  embedding_size: 2000000000\n", names=("model.embedding_size",))),
    Case("set_batch_1e18", _override("train.batch_size=1000000000000000000", names=("train.batch_size",))),
    Case("set_lr_inf", _override("optim.lr=inf", names=("optim.lr",))),
    Case("set_lr_nan", _override("optim.lr=nan", names=("optim.lr",))),
    Case("set_yaml_tag", _override("optim.lr=!!python/object/apply:time.sleep [120]", names=("optim.lr",))),
    Case("set_yaml_binary_tag", _override("data.train=!!binary aGVsbG8=", names=("data.train",))),
    Case("config_name_absolute", _config(b"name: /tmp/marginface-hostile-escape\n", names=("name",),
                                         outputs=["/tmp/marginface-hostile-escape"])),
    Case("config_name_dotdot", _config(b"name: ../../escaped\n", names=("name",))),
    # reports
    Case("compare_list_report", _compare("[1, 2, 3]")),
    Case("compare_deep_json", _compare("[" * 100_000 + "]" * 100_000)),
    Case("compare_nan_object", _compare('{"eval": [NaN]}')),
    Case("compare_nan_metric_json", _compare('{"eval": {"lfw": {"accuracy": NaN, "auc": Infinity}}}', accept=True)),
    Case("set_nested_50k", _override("data.val=" + "[" * 50_000 + "]" * 50_000, names=("data.val",))),
    Case("lfw_pairs_header_1e12", _lfw_dir(b"1000000 1000000\nAlice 1 2\n")),
    # models
    Case("export_nan_weights", _nan_checkpoint),
    Case("onnx_output_dim_0", _onnx_output(["N", 0])),
    Case("onnx_output_dim_huge", _onnx_output(["N", 1_000_000])),
    Case("onnx_output_rank_3", _onnx_output(["N", 3, 1])),
    # NaN in data, archives
    Case("identify_nan_distractors", _identify_with_distractors(_nan_feats), needs_shared=True),
    Case("identify_npy_header_1e12", _identify_with_distractors(_npy_bomb_header), needs_shared=True),
    Case("npz_zip_bomb", _npz_bomb),
]
