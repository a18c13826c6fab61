"""``marginface serve``: an HTTP API (verify, embed, gallery enroll/search) and a web page over one
model, with FastAPI + uvicorn (the ``serve`` extra: ``pip install 'marginface[serve]'``).

    from marginface.serve import run
    run("model.onnx", gallery="faces.sqlite", port=8000, normalize="imagenet")

`create_app` (in `marginface.serve.app`) builds the ASGI app for tests or another server.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from marginface.errors import UserError
from marginface.serve.app import create_app, default_concurrency

__all__ = ["create_app", "run"]


def run(model, gallery: Union[str, Path, None] = None, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
        threads: Optional[int] = None, trust_code: bool = False, *, log_level: str = "info", **options) -> None:
    """Serve ``model`` (and ``gallery``) on ``host:port`` until interrupted.

    ``workers`` > 1 starts that many processes (uvicorn's), each loading the model once; the model
    must then be a path. ``options``: the other `create_app` keywords (``normalize``,
    ``detector_weights``, ``threshold``, ``flip``, ``concurrency``, ``max_*`` limits)."""
    try:
        import uvicorn  # deferred: uvicorn is the optional serve extra
    except ImportError:
        raise UserError("marginface serve needs uvicorn: pip install 'marginface[serve]'") from None
    workers = int(workers)
    if workers < 1:
        raise UserError(f"serve: --workers must be at least 1, got {workers}")
    if not 0 <= int(port) <= 65535:
        raise UserError(f"serve: --port must be 0..65535, got {port}")
    if workers == 1:
        app = create_app(model, gallery, threads=threads, trust_code=trust_code, **options)
        uvicorn.run(app, host=host, port=int(port), log_level=log_level)
        return
    if not isinstance(model, (str, Path)):
        raise UserError("serve: --workers > 1 needs the model as a path (each worker process loads it)")
    spec = {"model": str(model), "gallery": None if gallery is None else str(gallery), "threads": threads,
            "trust_code": bool(trust_code),
            "concurrency": options.pop("concurrency", None) or max(1, default_concurrency(threads) // workers)}
    spec.update({k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()})
    if not Path(model).expanduser().exists():
        raise UserError(f"{model}: model not found")
    os.environ["MARGINFACE_SERVE"] = json.dumps(spec)
    uvicorn.run("marginface.serve.app:app_from_environment", factory=True, host=host, port=int(port),
                workers=workers, log_level=log_level)
