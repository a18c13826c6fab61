"""marginface: margin-based softmax face recognition, from training to the phone.

The curated API (each name is imported on first use, so ``import marginface`` stays cheap)::

    import marginface
    r = marginface.verify("a.jpg", "b.jpg", model="model.onnx")   # {"similarity", "same", "threshold", ...}
    v = marginface.embed("a.jpg", model="model.onnx")             # unit embedding of the largest face
    cfg = marginface.load_config("configs/synthetic_mbf.yaml", ["train.max_steps=100"])
    report = marginface.Trainer(cfg, "runs/demo").fit()
    results = marginface.evaluate_model("runs/demo", ["lfw.bin"])  # the `eval --json` object

The package itself imports nothing of ours (layer 0 in tests/test_layering.py): ``_API`` maps
each public name to ``"module:attribute"`` as strings, resolved by ``__getattr__`` (PEP 562).
Evaluation is ``evaluate_model``: ``marginface.evaluate`` is the evaluation subpackage, and one
name cannot be both without the import system rebinding it.
"""
import importlib as _importlib

__version__ = "0.1.0"

_API = {
    "load_config": "marginface.train.runconfig:load_config",
    "Trainer": "marginface.train.trainer:Trainer",
    "build_backbone": "marginface.models:build_backbone",
    "load_model": "marginface.deploy.load:load_model",
    "evaluate_model": "marginface.deploy.api:evaluate",
    "evaluate_pairs": "marginface.evaluate.runner:evaluate_pair_set",  # DESIGN.md: a model on one PairSet
    "export": "marginface.deploy.export:export_model",
    "FaceEmbedder": "marginface.deploy.embedder:FaceEmbedder",
    "Gallery": "marginface.deploy.gallery_store:GalleryStore",
    "verify": "marginface.deploy.api:verify",
    "embed": "marginface.deploy.api:embed",
    "faces": "marginface.deploy.api:faces",
    "identify_folder": "marginface.deploy.gallery:identify_folder",
    "UserError": "marginface.errors:UserError",
}

__all__ = sorted(_API) + ["__version__"]


def _resolve(name: str):
    module, _, attr = _API[name].partition(":")
    return getattr(_importlib.import_module(module), attr)


def __getattr__(name: str):
    if name in _API:
        value = _resolve(name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'marginface' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
