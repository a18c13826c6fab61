"""Fold inference-mode BatchNorm into the convolution / linear layer that feeds it.

In eval mode BatchNorm is a per-channel affine map ``y = a * x + b`` with
``a = gamma / sqrt(running_var + eps)`` and ``b = beta - a * running_mean``. When it directly
follows a Conv2d (or a Linear), the pair is one layer with weights ``a * W`` (scaled per output
channel) and bias ``a * bias + b``. Folding removes every such BN from the exported graph: fewer
ops, fewer memory passes, and int8 quantisation then sees the weights that actually run.

The pass works on the traced ``torch.fx`` graph, so it finds ``conv -> bn`` wherever the model
wires it (inside ``nn.Sequential`` blocks or in hand-written ``forward`` methods). A BN that
does not directly follow a conv/linear (iresnet's pre-activation BN) is left alone: folding it
into the *next* conv is not exact next to zero padding.

Also the other inference rewrites: PReLU as ``Max(x, a*x)`` (`rewrite_prelu`) and thin-group
convolutions regrouped (`regroup_thin_convs`). They live with the models because evaluation
(`marginface.evaluate.runner`) runs them as well as deployment (`marginface.deploy.export`,
`compiled`, `bench`); `marginface.deploy.fold` re-exports every name.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from marginface.models.layers import regrouped_weight

_FOLDABLE = ((nn.Conv2d, nn.BatchNorm2d), (nn.Conv1d, nn.BatchNorm1d), (nn.Linear, nn.BatchNorm1d))
# attributes the rest of marginface reads off a backbone; kept on the folded copy
_KEEP_ATTRS = ("info", "input_size", "embedding_size", "normalize", "checkpoint_path", "threshold")


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``bn(x) == a * x + b`` per channel in eval mode (float64 for accuracy)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    var = bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A new conv/linear equal to ``bn(layer(x))`` in eval mode (``layer`` is not modified)."""
    scale, shift = bn_affine(bn)
    fused = copy.deepcopy(layer)
    weight = layer.weight.detach().double()
    shape = (-1,) + (1,) * (weight.dim() - 1)  # per output channel (dim 0 for conv and linear)
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    dtype = layer.weight.dtype
    fused.weight = nn.Parameter((weight * scale.view(shape)).to(dtype), requires_grad=False)
    fused.bias = nn.Parameter((bias * scale + shift).to(dtype), requires_grad=False)
    return fused


def _pair_kind(layer: nn.Module, bn: nn.Module) -> bool:
    return any(isinstance(layer, a) and type(bn) is b for a, b in _FOLDABLE)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every ``conv/linear -> BatchNorm`` pair folded.

    Returns a ``torch.fx.GraphModule`` (which exports to ONNX and TorchScript like any module)
    carrying the model's ``info`` (`marginface.inference.ModelInfo`) and its ``input_size`` /
    ``embedding_size`` / ``normalize`` attributes. Models
    that ``torch.fx`` cannot trace fall back to folding pairs that sit next to each other inside
    ``nn.Sequential`` containers.
    """
    src = copy.deepcopy(model).eval()
    try:
        folded = _fold_fx(src)
    except Exception:  # untraceable control flow: the simple structural pass still helps
        folded = _fold_sequential(src)
    for name in _KEEP_ATTRS:
        if hasattr(model, name):
            setattr(folded, name, getattr(model, name))
    return folded.eval()


def _fold_fx(model: nn.Module) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer, bn = modules[src.target], modules[node.target]
        if not _pair_kind(layer, bn) or bn.running_mean is None:
            continue
        _set_module(gm, src.target, fold_into(layer, bn))
        modules[src.target] = gm.get_submodule(src.target)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _fold_sequential(model: nn.Module) -> nn.Module:
    for container in list(model.modules()):
        if not isinstance(container, nn.Sequential):
            continue
        names = list(container._modules)
        for first, second in zip(names, names[1:]):
            layer, bn = container._modules[first], container._modules[second]
            if _pair_kind(layer, bn) and bn.running_mean is not None:
                container._modules[first] = fold_into(layer, bn)
                container._modules[second] = nn.Identity()
    return model


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, leaf = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def count_batchnorm(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class MaxFormPReLU(nn.Module):
    """``PReLU`` written as ``max(x, c*x) + min(d*x, 0)`` with ``c = min(a, 1)``, ``d = a - c``.

    Exactly PReLU for every slope ``a``: for ``a <= 1`` (``d = 0``) ``max(x, a*x)`` is ``x`` for
    ``x >= 0`` and ``a*x`` below; a slope above 1 puts the rest into the ``min`` term, which is
    left out of the graph when no slope needs it. Why: ONNX Runtime's CPU ``PRelu`` runs outside its
    blocked (NCHWc) convolution layout, so every PReLU costs a layout round trip; ``Mul`` and
    ``Max`` stay in the blocked layout. On mbf that took batch-1 latency from ~24 ms to ~10 ms.
    """

    def __init__(self, prelu: nn.PReLU) -> None:
        super().__init__()
        slope = prelu.weight.detach().reshape(-1)
        self.register_buffer("c", torch.clamp(slope, max=1.0).clone())
        self.register_buffer("d", (slope - torch.clamp(slope, max=1.0)).clone())
        self.per_channel = slope.numel() > 1
        self.needs_min = bool((self.d != 0).any())

    def _shape(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.per_channel:
            return t.reshape(())
        return t.reshape((1, -1) + (1,) * (x.dim() - 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.maximum(x, x * self._shape(self.c, x))
        if self.needs_min:
            y = y + torch.clamp(x * self._shape(self.d, x), max=0.0)
        return y


def _replace_children(model: nn.Module, kind: type, make) -> nn.Module:
    """Every submodule of type ``kind`` replaced (in place) by ``make(submodule)``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(child))
    return model


def rewrite_prelu(model: nn.Module) -> nn.Module:
    """Replace every ``nn.PReLU`` of ``model`` (in place) by the equivalent `MaxFormPReLU`."""
    return _replace_children(model, nn.PReLU, MaxFormPReLU)


def regroup_conv(conv: nn.Conv2d, channels_per_group: int) -> nn.Conv2d:
    """The same convolution with fewer, wider groups: ``channels_per_group`` input channels each,
    the original groups' weights on the block diagonal and zeros elsewhere (identical outputs;
    `models.layers.regrouped_weight`).

    Why: oneDNN's kernels for *thin* groups are slow. mbf's stem conv (128 channels in 64 groups of
    2, 56x56) as 32 groups of 4 does twice the multiply-adds in 0.74x the time in fp32 and 0.51x in
    bf16 (``benchmarks/grouped_conv.py``). A module for inference: training the zero blocks would
    make them non-zero (the training layer rebuilds its wide weight each step instead).
    """
    weight, groups = regrouped_weight(conv.weight.detach(), conv.groups, channels_per_group)
    if groups == conv.groups:
        return conv  # dense, depthwise (fast as it is), already wide enough, or no even merge
    wide = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        wide.weight.copy_(weight)
        if conv.bias is not None:
            wide.bias.copy_(conv.bias)
    return wide.to(device=conv.weight.device, dtype=conv.weight.dtype).train(conv.training)


def regroup_thin_convs(model: nn.Module, channels_per_group: int = 4) -> nn.Module:
    """Replace (in place) every grouped, non-depthwise Conv2d with fewer than ``channels_per_group``
    input channels per group by its `regroup_conv` equivalent; depthwise convs (one channel per
    group, which oneDNN handles well) are left alone."""
    return _replace_children(model, nn.Conv2d, lambda conv: regroup_conv(conv, channels_per_group))
