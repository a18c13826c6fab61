"""Deployment: export (ONNX / TorchScript, BN folded, int8), one model loader, benchmarks, the
detect -> align -> embed pipeline (`FaceEmbedder`), 1:1 verification and 1:N galleries.

    from marginface.deploy.load import load_model            # run dir, .pt, .onnx (ours or foreign)
    from marginface.deploy.export import export_model        # `marginface export`
    from marginface.deploy.embedder import FaceEmbedder      # photos -> unit embeddings
    from marginface.deploy.gallery import Gallery, enroll_store, open_gallery   # `marginface gallery`
    from marginface.deploy.gallery_store import GalleryStore # the SQLite gallery (.sqlite/.db)

Submodules are imported on use so that ``import marginface`` stays light (no onnxruntime).
See docs/deployment.md.
"""
