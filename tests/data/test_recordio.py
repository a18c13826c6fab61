"""RecordIO packs: the real dmlc/insightface layout, written by hand and by our writer, and damage."""
from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from marginface.data.dataset import FaceDataset
from marginface.data.recordio import (
    MAGIC,
    RecordIOReader,
    RecordIOSource,
    RecordIOWriter,
    pack_record,
    unpack_record,
    write_pack,
)
from marginface.data.sources import open_source
from marginface.errors import UserError


def face_like(seed: int, size: int = 112) -> np.ndarray:
    """A smooth random RGB image (JPEG-friendly, distinct per seed)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def decode(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def hand_built_pack(folder: Path, labels: list[int], image_labels_as_array: bool = False) -> list[bytes]:
    """An insightface pack built with struct only (no project writer): header record 0, images
    1..N, then one (start, end) record per identity; returns the JPEG bytes per image."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [jpeg(face_like(i)) for i in range(len(labels))]
    num_classes = max(labels) + 1

    def header(flag: int, label: float, rid: int, extra: list[float]) -> bytes:
        return struct.pack("<IfQQ", flag, label, rid, 0) + struct.pack(f"<{len(extra)}f", *extra)

    records = []
    n = len(images)
    records.append((0, header(2, 0.0, 0, [n + 1, n + 1 + num_classes])))
    for i, (data, label) in enumerate(zip(images, labels)):
        if image_labels_as_array:
            records.append((i + 1, header(2, 0.0, i + 1, [label, 0.0]) + data))
        else:
            records.append((i + 1, header(0, float(label), i + 1, []) + data))
    for c in range(num_classes):
        keys = [i + 1 for i, label in enumerate(labels) if label == c]
        records.append((n + 1 + c, header(2, 0.0, n + 1 + c, [keys[0], keys[-1] + 1])))
    rec, idx = bytearray(), []
    for key, payload in records:
        idx.append(f"{key}\t{len(rec)}\n")
        rec += struct.pack("<II", 0xCED7230A, len(payload)) + payload + b"\0" * (-len(payload) % 4)
    (folder / "train.rec").write_bytes(bytes(rec))
    (folder / "train.idx").write_text("".join(idx))
    (folder / "property").write_text(f"{num_classes},112,112")
    return images


@pytest.mark.parametrize("labels_as_array", [False, True])
def test_hand_built_insightface_pack(tmp_path: Path, labels_as_array: bool) -> None:
    labels = [0, 0, 1, 2, 2, 2]
    images = hand_built_pack(tmp_path / "pack", labels, labels_as_array)
    source = open_source(tmp_path / "pack")
    assert isinstance(source, RecordIOSource)
    assert len(source) == 6 and source.num_classes == 3
    assert source.labels.dtype == np.int64 and source.labels.tolist() == labels
    np.testing.assert_array_equal(source.read(3), decode(images[3]))
    assert "3 identities" in source.describe()
    # ...and through the dataset the trainer uses
    ds = FaceDataset(source, flip=False)
    image, label = ds[4]
    assert image.dtype == torch.uint8 and image.shape == (3, 112, 112) and label == 2
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), decode(images[4]))


def test_writer_round_trip_and_loader_workers(tmp_path: Path) -> None:
    labels = [0, 1, 1, 2, 3, 3, 3, 4]
    originals = [face_like(10 + i) for i in range(len(labels))]
    write_pack(tmp_path, ((jpeg(im), lab) for im, lab in zip(originals, labels)), 5, (112, 112))
    assert (tmp_path / "property").read_text().strip() == "5,112,112"
    source = RecordIOSource(tmp_path / "train.rec")
    assert source.labels.tolist() == labels and source.num_classes == 5
    # the identity records written after the images give each class's key range
    reader = source.reader
    head0 = reader.read_header(0)
    assert head0.flag == 2 and head0.label.tolist() == [9.0, 14.0]
    assert reader.read_header(10).label.tolist() == [2.0, 4.0]  # class 1 = keys 2, 3
    for i in range(len(labels)):
        assert np.abs(source.read(i).astype(int) - originals[i]).mean() < 3
    # DataLoader workers each open their own handle (the reader re-opens after fork)
    source.read(0)  # parent handle is open before the fork
    loader = torch.utils.data.DataLoader(FaceDataset(source, flip=False), batch_size=4, num_workers=2)
    got = torch.cat([lab for _, lab in loader]).tolist()
    assert got == labels


def test_plain_pack_without_header_lists_all_keys(tmp_path: Path) -> None:
    with RecordIOWriter(tmp_path / "data.rec", tmp_path / "data.idx") as w:
        for key, label in [(5, 1), (7, 0), (9, 1)]:
            w.write(key, pack_record(float(label), jpeg(face_like(key, 64))))
    source = open_source(tmp_path / "data.rec")
    assert source.keys.tolist() == [5, 7, 9] and source.labels.tolist() == [1, 0, 1] and source.num_classes == 2
    ds = FaceDataset(source, flip=False)
    assert ds[0][0].shape == (3, 112, 112)  # 64x64 resized to the training size


def test_payload_holding_the_magic_is_split_and_rejoined(tmp_path: Path) -> None:
    magic = struct.pack("<I", MAGIC)
    payload = b"abcd" + magic + b"efgh" + magic + b"ijk"  # magic at aligned offsets 4 and 12
    with RecordIOWriter(tmp_path / "m.rec") as w:
        w.write(0, payload)
        w.write(1, b"tail")
    raw = (tmp_path / "m.rec").read_bytes()
    cflags = [struct.unpack_from("<I", raw, 4)[0] >> 29]
    assert cflags == [1]  # first part of a multi-part record, as dmlc writes it
    reader = RecordIOReader(tmp_path / "m.rec")
    assert reader.read(0) == payload and reader.read(1) == b"tail"


def test_unpack_record_label_array() -> None:
    header, body = unpack_record(pack_record([3.0, 7.0], b"xyz", record_id=4))
    assert header.flag == 2 and header.label.tolist() == [3.0, 7.0] and header.id == 4 and body == b"xyz"


def small_pack(tmp_path: Path, n: int = 4) -> Path:
    write_pack(tmp_path, ((jpeg(face_like(i)), i * 2 // n) for i in range(n)), 2)
    return tmp_path


def test_truncated_rec_names_file_and_record(tmp_path: Path) -> None:
    with RecordIOWriter(tmp_path / "plain.rec") as w:
        for key in range(3):
            w.write(key, pack_record(float(key), jpeg(face_like(key))))
    rec = tmp_path / "plain.rec"
    rec.write_bytes(rec.read_bytes()[:-100])  # cut inside the last record
    with pytest.raises(UserError, match=r"plain\.rec: record 2 is truncated"):
        RecordIOSource(rec)
    # an insightface pack cut short: later .idx offsets point past the end
    pack = small_pack(tmp_path / "pack")
    data = (pack / "train.rec").read_bytes()
    (pack / "train.rec").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"train\.idx:\d+: offset \d+ of key \d+ is past the end of train\.rec .*truncated"):
        RecordIOSource(pack / "train.rec")


def test_idx_offset_past_end(tmp_path: Path) -> None:
    pack = small_pack(tmp_path)
    lines = (pack / "train.idx").read_text().splitlines()
    lines[2] = "2\t99999999"
    (pack / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"train\.idx:3: offset 99999999 of key 2 is past the end"):
        RecordIOSource(pack / "train.rec")


def test_bad_magic(tmp_path: Path) -> None:
    pack = small_pack(tmp_path)
    offset = int((pack / "train.idx").read_text().splitlines()[2].split()[1])
    data = bytearray((pack / "train.rec").read_bytes())
    data[offset : offset + 4] = b"XXXX"
    (pack / "train.rec").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"record 2 at byte \d+ has bad magic"):
        RecordIOSource(pack / "train.rec")


def test_non_jpeg_and_corrupt_payloads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = jpeg(face_like(1))
    corrupt = good[:200] + bytes(len(good) - 200)  # a JPEG header, then zeros
    write_pack(tmp_path, [(good, 0), (b"GIF89a not an image", 0), (corrupt, 1), (good, 1)], 2)
    source = RecordIOSource(tmp_path / "train.rec")
    with pytest.raises(UserError, match=r"train\.rec record 2: payload is not a JPEG or PNG"):
        source.read(1)
    with pytest.raises(UserError, match=r"train\.rec record 3: not a readable image"):
        source.read(2)
    strict = FaceDataset(source, skip_bad=False)
    with pytest.raises(UserError, match="record 3"):
        strict[2]
    lenient = FaceDataset(source, skip_bad=True)
    with caplog.at_level("WARNING"):
        for i in range(len(source)):
            image, label = lenient[i]
            assert image.shape == (3, 112, 112)
    assert lenient.bad_images() == 2
    assert "record 2" in caplog.text and "record 3" in caplog.text


def test_bad_idx_lines(tmp_path: Path) -> None:
    pack = small_pack(tmp_path)
    lines = (pack / "train.idx").read_text().splitlines()
    (pack / "train.idx").write_text("\n".join(lines[:2] + ["2\tabc"] + lines[3:]) + "\n")
    with pytest.raises(UserError, match=r"train\.idx:3: key and offset must be integers"):
        RecordIOSource(pack / "train.rec")
    (pack / "train.idx").write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(UserError, match=r"train\.idx: key 1 appears more than once"):
        RecordIOSource(pack / "train.rec")


def test_inspect_lists_unreadable_records(tmp_path: Path) -> None:
    from marginface.data.tools import convert, inspect_path

    good = jpeg(face_like(5))
    write_pack(tmp_path / "pack", [(good, 0), (good[:300] + bytes(500), 0), (good, 1)], 2)
    info = inspect_path(tmp_path / "pack")
    assert (info["format"], info["identities"], info["images"]) == ("recordio", 2, 3)
    assert len(info["unreadable"]) == 1 and "record 2" in info["unreadable"][0]
    with pytest.raises(UserError, match="not an empty directory"):
        convert(tmp_path / "pack", tmp_path / "pack")
