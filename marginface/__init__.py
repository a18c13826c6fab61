"""marginface: margin-based softmax face recognition, from training to the phone.

The curated API (each name is imported on first use, so ``import marginface`` stays cheap)::

    import marginface
    r = marginface.verify("a.jpg", "b.jpg", model="model.onnx")   # {"similarity", "same", "threshold", ...}
    v = marginface.embed("a.jpg", model="model.onnx")             # unit embedding of the largest face
    cfg = marginface.load_config("configs/synthetic_mbf.yaml", ["train.max_steps=100"])
    report = marginface.Trainer(cfg, "runs/demo").fit()
    results = marginface.evaluate("runs/demo", ["lfw.bin"])      # the `eval --json` object

The package itself imports nothing of ours (layer 0 in tests/test_layering.py): ``_API`` maps
each public name to ``"module:attribute"`` as strings, resolved by ``__getattr__`` (PEP 562).
"""
import importlib as _importlib
import sys as _sys
import types as _types

__version__ = "0.1.0"

_API = {
    "load_config": "marginface.config:load_config",
    "Trainer": "marginface.train.trainer:Trainer",
    "build_backbone": "marginface.models:build_backbone",
    "load_model": "marginface.deploy.load:load_model",
    "evaluate": "marginface.deploy.api:evaluate",
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
        if name != "evaluate":  # see _Package: the subpackage of that name must stay reachable
            globals()[name] = value
        return value
    raise AttributeError(f"module 'marginface' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))


class _EvaluateEntry:
    """``marginface.evaluate``: the function `marginface.deploy.api.evaluate` when called, the
    subpackage ``marginface.evaluate`` for attribute access (``marginface.evaluate.metrics``), so
    neither hides the other whichever is imported first."""

    __name__ = "marginface.evaluate"  # so that `import marginface.evaluate.x as y` finds the submodule

    def __call__(self, *args, **kwargs):
        return _resolve("evaluate")(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(_importlib.import_module("marginface.evaluate"), name)

    def __dir__(self):
        return dir(_importlib.import_module("marginface.evaluate"))

    @property
    def __doc__(self):
        return _resolve("evaluate").__doc__

    def __repr__(self) -> str:
        return "<marginface.evaluate: function evaluate(model, sets, ...) and subpackage>"


class _Package(_types.ModuleType):
    """The module type of ``marginface``: keeps ``marginface.evaluate`` the callable entry above
    even after the import system binds the subpackage to that name."""

    @property
    def evaluate(self):
        return _EVALUATE

    @evaluate.setter
    def evaluate(self, value):  # the import system binding the subpackage: already reachable
        pass


_EVALUATE = _EvaluateEntry()
_sys.modules[__name__].__class__ = _Package
