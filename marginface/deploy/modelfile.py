"""Writing model files, shared by every exporter (`export`, `compiled`, `quantize`): the atomic
temp path for a model file (refusing a directory), the size of a model with its external data,
and the ONNX metadata block. `marginface.deploy.export` re-exports these names."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Union

from marginface.errors import UserError
from marginface.io.atomic import atomic_path as io_atomic_path


@contextlib.contextmanager
def atomic_path(out: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it is fsynced and renamed to ``out``,
    on any error it is removed and ``out`` is untouched (`marginface.io.atomic.atomic_path`; a
    failed write, e.g. a full disk, is a `UserError` naming ``out``)."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a directory; give a file name for the exported model")
    with io_atomic_path(out) as tmp:
        yield tmp


def file_mb(path: Union[str, Path]) -> float:
    path = Path(path)
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.is_file():
        total += data.stat().st_size
    return total / 2**20


def set_onnx_metadata(model_proto, metadata: dict[str, str], doc: str = "") -> None:
    del model_proto.metadata_props[:]
    for key, value in metadata.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    if doc:
        model_proto.doc_string = doc
    model_proto.producer_name = "marginface"
