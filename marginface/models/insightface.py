"""insightface's arcface_torch backbones: their names, their tensor names, and recognising an
architecture from a plain state dict.

Two name tables, written out here so they can be read and tested in both directions:

- **IResNet** (``get_model("r18" | "r34" | "r50" | "r100" | "r200")`` in
  ``recognition/arcface_torch/backbones/iresnet.py``): our `IResNet` uses the same module names
  (conv1, bn1, prelu, layer1..4 of IBasicBlock bn1/conv1/bn2/prelu/conv2/bn3/downsample.0/1, bn2,
  fc, features), so the table is the identity: ``r50`` <-> ``iresnet50``.
- **mbf** (``get_model("mbf")``, ``mobilefacenet.py``, blocks (1, 4, 6, 2), scale 2): every one of
  its 333 tensors has another name than ours (same shapes, same order). Its units are
  ``ConvBlock`` (``<p>.layers.0`` conv, ``.layers.1`` BN, ``.layers.2`` PReLU) and ``LinearBlock``
  (conv + BN); a ``DepthWise`` block is three units ``<p>.layers.0/1/2`` (1×1 expand, 3×3
  depthwise, linear 1×1 project); a ``Residual`` stage is ``<p>.layers.<i>`` DepthWise blocks.

  ============================================  ==========================================
  insightface ``mbf``                           marginface ``mbf``
  ============================================  ==========================================
  ``layers.0.layers.{0,1,2}``                   ``stem.0.{0,1,2}``  (3×3 s2 conv, BN, PReLU)
  ``layers.1.layers.{0,1,2}``                   ``stem.1.{0,1,2}``  (3×3 conv, groups of 2)
  ``layers.2`` (DepthWise, s2)                  ``blocks.0``
  ``layers.3.layers.{0..3}`` (Residual)         ``blocks.1`` .. ``blocks.4``
  ``layers.4`` (DepthWise, s2)                  ``blocks.5``
  ``layers.5.layers.{0..5}`` (Residual)         ``blocks.6`` .. ``blocks.11``
  ``layers.6`` (DepthWise, s2)                  ``blocks.12``
  ``layers.7.layers.{0,1}`` (Residual)          ``blocks.13``, ``blocks.14``
  DepthWise ``<p>.layers.{0,1,2}``              ``blocks.<i>.{expand,depthwise,project}``
  ``conv_sep.layers.{0,1,2}``                   ``conv_head.{0,1,2}``
  ``features.layers.0.layers.{0,1}`` (GDC)      ``head.gdc.{0,1}``
  ``features.layers.2.weight`` (Linear)         ``head.linear.weight``
  ``features.layers.3.*`` (BatchNorm1d)         ``head.bn.*``
  ============================================  ==========================================

  Inside a unit: ``layers.0.weight`` <-> ``0.weight`` (conv), ``layers.1.<bn>`` <-> ``1.<bn>``,
  ``layers.2.weight`` <-> ``2.weight`` (PReLU).

- **ViT** (``get_model("vit_t" | "vit_s" | "vit_b")``, ``vit.py``): our `VisionTransformer` uses
  its module names, so the table is the identity as for IResNet.

`recognise` reads a state dict in our names and says which backbone (and embedding size, input
size, width) builds a model it fits; `marginface.models.pretrained` loads it. Pure functions of
names and shapes: no file is read here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

import torch

from marginface.errors import UserError
from marginface.models.complexity import final_map_size
from marginface.models.iresnet import IRESNET_LAYERS, STAGE_WIDTHS
from marginface.models.vit import PATCH_SIZE, VIT_CONFIGS

# insightface get_model(name) -> our backbone name
INSIGHTFACE_BACKBONES = MappingProxyType({
    **{f"r{depth}": f"iresnet{depth}" for depth in IRESNET_LAYERS},
    "mbf": "mbf",
    **{name: name for name in VIT_CONFIGS},
})
OURS_TO_INSIGHTFACE = MappingProxyType({ours: theirs for theirs, ours in INSIGHTFACE_BACKBONES.items()})

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _unit_keys(theirs: str, ours: str, activation: bool) -> list[tuple[str, str]]:
    """One conv unit: ConvBlock/LinearBlock ``theirs`` <-> our ConvBN ``ours``."""
    pairs = [(f"{theirs}.layers.0.weight", f"{ours}.0.weight")]
    pairs += [(f"{theirs}.layers.1.{s}", f"{ours}.1.{s}") for s in BN_SUFFIXES]
    if activation:
        pairs.append((f"{theirs}.layers.2.weight", f"{ours}.2.weight"))
    return pairs


def _mbf_table() -> tuple[tuple[str, str], ...]:
    """(insightface name, marginface name) for every tensor of ``mbf``, in module order."""
    pairs = _unit_keys("layers.0", "stem.0", True) + _unit_keys("layers.1", "stem.1", True)
    depthwise_blocks = ["layers.2", *(f"layers.3.layers.{i}" for i in range(4)), "layers.4",
                        *(f"layers.5.layers.{i}" for i in range(6)), "layers.6",
                        *(f"layers.7.layers.{i}" for i in range(2))]
    for index, theirs in enumerate(depthwise_blocks):
        ours = f"blocks.{index}"
        pairs += _unit_keys(f"{theirs}.layers.0", f"{ours}.expand", True)
        pairs += _unit_keys(f"{theirs}.layers.1", f"{ours}.depthwise", True)
        pairs += _unit_keys(f"{theirs}.layers.2", f"{ours}.project", False)
    pairs += _unit_keys("conv_sep", "conv_head", True)
    pairs += _unit_keys("features.layers.0", "head.gdc", False)
    pairs.append(("features.layers.2.weight", "head.linear.weight"))
    pairs += [(f"features.layers.3.{s}", f"head.bn.{s}") for s in BN_SUFFIXES]
    return tuple(pairs)


MBF_TABLE = _mbf_table()
MBF_FROM_INSIGHTFACE = MappingProxyType(dict(MBF_TABLE))
MBF_TO_INSIGHTFACE = MappingProxyType({ours: theirs for theirs, ours in MBF_TABLE})


def is_insightface_mbf(state: Mapping[str, object]) -> bool:
    """Names of insightface's MobileFaceNet (``conv_sep`` and the GDC ``features.layers``)."""
    return "conv_sep.layers.0.weight" in state and "features.layers.2.weight" in state


def _rename(state: Mapping[str, torch.Tensor], table: Mapping[str, str], what: str, where: str) -> dict:
    unknown = [key for key in state if key not in table]
    missing = [key for key in table if key not in state and not key.endswith("num_batches_tracked")]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unexpected {', '.join(f'{k} {tuple(state[k].shape)}' for k in unknown[:3])}")
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        raise UserError(f"{where}does not match insightface's {what} ({len(state)} tensors, "
                        f"{len(table)} expected): {'; '.join(parts)}")
    return {table[key]: value for key, value in state.items()}


def from_insightface(state: Mapping[str, torch.Tensor], where: str = "") -> dict:
    """An arcface_torch state dict in our names (mbf renamed through `MBF_TABLE`; IResNet as is)."""
    if is_insightface_mbf(state):
        return _rename(state, MBF_FROM_INSIGHTFACE, "mbf", where)
    return dict(state)


def to_insightface(state: Mapping[str, torch.Tensor], backbone: str, where: str = "") -> dict:
    """Our state dict of ``backbone`` in the names insightface's ``get_model(name)`` has."""
    if backbone not in OURS_TO_INSIGHTFACE:
        raise UserError(f"{where}insightface's arcface_torch has no {backbone}; it builds "
                        f"{', '.join(sorted(INSIGHTFACE_BACKBONES.values()))}")
    if backbone == "mbf":
        return _rename(state, MBF_TO_INSIGHTFACE, "mbf (in our names)", where)
    return dict(state)


# ---------------------------------------------------------------------------------------------- recognition
@dataclass(frozen=True)
class Recognised:
    """What builds a model a state dict fits: `build_backbone(name, embedding_size, input_size, **options)`."""

    name: str
    embedding_size: int
    input_size: int
    options: dict = field(default_factory=dict)


def _shape(state: Mapping[str, torch.Tensor], key: str) -> Optional[tuple[int, ...]]:
    value = state.get(key)
    return tuple(value.shape) if torch.is_tensor(value) else None


def input_size_for_map(map_size: int) -> int:
    """The input side whose last feature map is ``map_size`` (16 × map: 7 -> 112, 4 -> 64)."""
    size = 16 * map_size
    assert final_map_size(size) == map_size
    return size


def _width_mult(channels: int, base: int) -> float:
    return 1.0 if channels == base else channels / base


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {key[len(prefix):].split(".", 1)[0] for key in state if key.startswith(prefix)}
    return len({i for i in indices if i.isdigit()})


def _recognise_iresnet(state: Mapping[str, torch.Tensor]) -> Recognised:
    layers = tuple(_count_blocks(state, f"layer{stage}.") for stage in (1, 2, 3, 4))
    depth = next((d for d, counts in IRESNET_LAYERS.items() if counts == layers), None)
    if depth is None:
        known = ", ".join(f"{d}: {c}" for d, c in IRESNET_LAYERS.items())
        raise UserError(f"IResNet with blocks per stage {layers}, which is none of the depths marginface builds ({known})")
    squeeze_excite = any(".se." in key for key in state)
    name = f"iresnet{depth}" + ("_se" if squeeze_excite else "")
    stem = _shape(state, "conv1.weight")
    fc = _shape(state, "fc.weight")
    features = _shape(state, "features.weight")
    if not (stem and fc and features and len(fc) == 2):
        raise UserError("IResNet without conv1 / fc / features tensors")
    last = _shape(state, "bn2.weight")[0] if _shape(state, "bn2.weight") else STAGE_WIDTHS[-1]
    options = {}
    if stem[0] != STAGE_WIDTHS[0]:
        options["width_mult"] = _width_mult(stem[0], STAGE_WIDTHS[0])
    map_area = fc[1] // last if last else 0
    map_size = int(round(map_area ** 0.5))
    if map_size < 1 or map_size * map_size * last != fc[1]:
        raise UserError(f"IResNet fc.weight {fc} does not fit a square map of {last} channels")
    return Recognised(name, features[0], input_size_for_map(map_size), options)


def _recognise_mobilefacenet(state: Mapping[str, torch.Tensor]) -> Recognised:
    stem = _shape(state, "stem.0.0.weight")
    stem2 = _shape(state, "stem.1.0.weight")
    gdc = _shape(state, "head.gdc.0.weight")
    linear = _shape(state, "head.linear.weight")
    if not (stem and stem2 and gdc and linear):
        raise UserError("MobileFaceNet without stem / head.gdc / head.linear tensors")
    squeeze_excite = any(".excite." in key for key in state)
    if stem2[1] == 2:  # groups of 2 channels in the second stem conv: insightface's mbf
        if squeeze_excite:
            raise UserError("mbf with squeeze-excitation blocks, which marginface does not build")
        name, base = "mbf", 128
    else:
        name, base = ("mobilefacenet_se", 64) if squeeze_excite else ("mobilefacenet", 64)
    options = {}
    if stem[0] != base:
        options["width_mult"] = _width_mult(stem[0], base)
    return Recognised(name, linear[0], input_size_for_map(gdc[-1]), options)


def _recognise_resnet50(state: Mapping[str, torch.Tensor]) -> Recognised:
    fc = _shape(state, "head.fc.weight")
    bn = _shape(state, "head.bn.weight")
    if not (fc and bn):
        raise UserError("ResNet-50 without head.fc / head.bn tensors")
    map_size = int(round((fc[1] // bn[0]) ** 0.5))
    return Recognised("resnet50", fc[0], input_size_for_map(max(map_size, 1)))


def _recognise_resnet50_gap(state: Mapping[str, torch.Tensor]) -> Recognised:
    fc = _shape(state, "embedding.weight")
    if not fc or len(fc) != 2:
        raise UserError("ResNet-50 (GAP) without an embedding.weight matrix")
    return Recognised("resnet50_gap", fc[0], 112)  # global pooling: any input size fits; 112 by default


def vit_input_size(grid: int) -> int:
    """The input side (a multiple of 8) whose 9-pixel patch grid is ``grid`` per side: 12 -> 112, 7 -> 64."""
    return next(size for size in range(PATCH_SIZE * grid, PATCH_SIZE * grid + PATCH_SIZE) if size % 8 == 0)


def _recognise_vit(state: Mapping[str, torch.Tensor]) -> Recognised:
    pos = _shape(state, "pos_embed")
    out = _shape(state, "feature.2.weight")
    if not (pos and out and len(pos) == 3):
        raise UserError("ViT without pos_embed / feature.2.weight tensors")
    depth = _count_blocks(state, "blocks.")
    name = next((n for n, (width, d, _) in VIT_CONFIGS.items() if (width, d) == (pos[2], depth)), None)
    if name is None:
        known = ", ".join(f"{n}: width {w}, depth {d}" for n, (w, d, _) in VIT_CONFIGS.items())
        raise UserError(f"ViT of width {pos[2]} and depth {depth}, which is none of those marginface builds ({known})")
    grid = int(round(pos[1] ** 0.5))
    if grid * grid != pos[1]:
        raise UserError(f"ViT pos_embed {pos} does not hold a square grid of patches")
    return Recognised(name, out[0], vit_input_size(grid))


def recognise(state: Mapping[str, torch.Tensor]) -> Recognised:
    """The backbone a state dict (in our names: run `from_insightface` first) was saved from.

    IResNet: depth from the block count of each stage, SE from ``.se.`` tensors, width from
    ``conv1``, embedding size from ``features``, input size from ``fc``'s input width. MobileFaceNet
    family: ``mbf`` when the second stem conv has groups of 2 channels (the paper's net is
    depthwise), SE from ``.excite.``, embedding size from ``head.linear``, input size from the GDC
    kernel. ResNet-50 from ``head.fc`` (``resnet50_gap`` from ``embedding``). ViT: the config from
    the width of ``pos_embed`` and the block count, input size from its token count. Raises `UserError` (without a file name: callers add it)
    when none of these fits; shapes are then checked against the built model by the caller.
    """
    if "stem.0.0.weight" in state:
        return _recognise_mobilefacenet(state)
    if "layer1.0.bn1.weight" in state and "features.weight" in state:
        return _recognise_iresnet(state)
    if "layer1.0.conv3.weight" in state and "head.fc.weight" in state:
        return _recognise_resnet50(state)
    if "layer1.0.conv3.weight" in state and "embedding.weight" in state:
        return _recognise_resnet50_gap(state)
    if "pos_embed" in state and "patch_embed.proj.weight" in state:
        return _recognise_vit(state)
    first = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(state.items())[:3] if torch.is_tensor(v))
    raise UserError(f"not a face backbone marginface builds (iresnet*, mbf, mobilefacenet*, resnet50*, vit_*, or "
                    f"insightface's r18..r200 / mbf / vit_t..vit_b); its first tensors: {first or 'none'}")
