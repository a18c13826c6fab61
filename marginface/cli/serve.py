"""`marginface serve`: the HTTP API and web page (verify, embed, gallery enroll/search) over one model."""
from __future__ import annotations

from marginface.cli.options import NORMALIZATIONS, add_detector_options, add_model_argument, add_threads, check_positive

# deferred: startup time. `marginface.serve` (and FastAPI/uvicorn, the optional `serve` extra) is
# imported when the command runs.


def register(sub) -> None:
    s = sub.add_parser("serve", help="HTTP API + web page: verify, embed, gallery enroll/search")
    add_model_argument(s)
    add_threads(s, "CPU threads per request for the detector (PyTorch) and the model (PyTorch or ONNX Runtime)")
    add_detector_options(s)
    s.add_argument("--normalize", choices=NORMALIZATIONS,
                   help="input normalisation for a model without metadata (default: the model's, else arcface)")
    s.add_argument("--gallery", help="SQLite gallery (.sqlite/.db), created when missing")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    s.add_argument("--workers", type=int, default=1, help="server processes, each loading the model once")
    s.add_argument("--concurrency", type=int, help="requests running the model at once (default cores/threads)")
    s.add_argument("--threshold", type=float, help="cosine threshold for 'same' (default: the model's eval threshold)")
    s.add_argument("--no-flip", action="store_true", help="do not add the mirror image's embedding")
    s.add_argument("--max-image-mb", type=float, default=16, help="largest image upload, MiB")
    s.add_argument("--max-request-mb", type=float, default=64, help="largest request body, MiB")
    s.add_argument("--max-megapixels", type=float, default=40, help="largest decoded image, megapixels")
    s.set_defaults(func=run_serve)


def run_serve(args) -> int:
    from marginface.errors import UserError

    check_positive("--workers", args.workers)
    check_positive("--concurrency", args.concurrency)
    for flag, value in (("--max-image-mb", args.max_image_mb), ("--max-request-mb", args.max_request_mb),
                        ("--max-megapixels", args.max_megapixels)):
        if not value > 0:
            raise UserError(f"serve: {flag} must be > 0, got {value}")
    if args.detector != "mtcnn":  # the service's FaceEmbedder uses the default detector
        raise UserError(f"serve: --detector {args.detector} is not supported yet; the service finds faces with mtcnn")
    try:
        from marginface.serve import run  # deferred: startup time
    except ImportError as exc:  # fastapi/uvicorn: the optional serve extra
        raise UserError(f"marginface serve needs FastAPI and uvicorn ({exc.name} is missing): "
                        f"pip install 'marginface[serve]'") from None
    run(args.model, args.gallery, host=args.host, port=args.port, workers=args.workers, threads=args.threads,
        trust_code=args.trust_code, normalize=args.normalize, detector_weights=args.detector_weights,
        threshold=args.threshold, flip=not args.no_flip, concurrency=args.concurrency,
        max_image_bytes=int(args.max_image_mb * 2**20), max_request_bytes=int(args.max_request_mb * 2**20),
        max_pixels=int(args.max_megapixels * 1e6))
    return 0
