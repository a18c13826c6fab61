"""Face-recognition backbones: images (N×3×H×W, normalised) -> un-normalised N×D embeddings.

Build them by name with `build_backbone`; `count_parameters` / `count_macs` report their size.
"""
from marginface.models.complexity import count_macs, count_parameters
from marginface.models.registry import build_backbone, list_backbones

__all__ = ["build_backbone", "count_macs", "count_parameters", "list_backbones"]
