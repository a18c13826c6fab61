"""Layers with faster CPU training paths than their stock PyTorch versions (same parameters, same maths).

The backbones are built with them; `set_fast_layers(model, False)` (``train.fast_layers: false``)
switches a model back to the stock classes in place. Under ``torch.fx`` tracing each one is a single
``call_module`` node like the torch.nn layer it extends. Measured in docs/performance.md.

`PReLU` is `nn.PReLU` (a subclass: same ``weight`` parameter, same state_dict keys, same
``isinstance`` for the export rewrites in `marginface.deploy.fold`) whose backward is built from
cheap vectorised elementwise kernels. Why: in torch 2.x on CPU ``aten::_prelu_kernel_backward`` runs
at ~1 GB/s (about 120 ms for one 64×128×56×56 fp32 map on 2 cores, 15x a plain elementwise pass)
and was a fifth of an `mbf` training step. The forward stays
``torch.prelu`` (fast); the backward is

    g_pos = threshold_backward(g, x, 0)          # g where x > 0, else 0 (exactly PReLU's rule at 0)
    g_neg = g - g_pos                            # g where x <= 0
    grad_x = g_pos + weight * g_neg
    grad_weight = sum over all but the channel dim of (g_neg * x)   (fp32 accumulation)

four passes and two allocations instead of the slow fused kernel. The fast path is used only when a
gradient is wanted, in eager mode on CPU; under `torch.compile`, `torch.export` / ONNX export,
TorchScript tracing and on other devices the layer is exactly ``F.prelu`` (inductor generates a
fused kernel for it; exporters see the stock op).

`Conv2d` runs the grouped convolutions that oneDNN handles slowly in bf16 another way under CPU
autocast: thin groups (2-7 channels, `mbf`'s stem) as wider groups with zero blocks
(`regrouped_weight`), strided depthwise ones in fp32.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


def _channel_view(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight`` (C or 1 values) shaped to broadcast against ``x`` along dim 1."""
    if weight.numel() == 1 or x.dim() < 2:
        return weight.reshape(())
    return weight.reshape((1, -1) + (1,) * (x.dim() - 2))


class _PReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.prelu(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        g_pos = torch.ops.aten.threshold_backward(grad, x, 0)
        g_neg = grad - g_pos
        grad_x = grad_w = None
        if need_x:
            grad_x = g_pos.addcmul_(g_neg, _channel_view(weight, x).to(g_neg.dtype))  # g_pos is ours: in place
        if need_w:
            prod = g_neg.mul_(x)  # g_neg is ours too
            acc = torch.promote_types(prod.dtype, torch.float32)  # bf16/fp16 sum in fp32
            if weight.numel() == 1 or x.dim() < 2:
                grad_w = prod.sum(dtype=acc)
            else:
                dims = [0] + list(range(2, x.dim()))
                grad_w = prod.sum(dims, dtype=acc)
            grad_w = grad_w.reshape(weight.shape).to(weight.dtype)
        return grad_x, grad_w


def _fx_leaf(module: nn.Module, x: torch.fx.Proxy) -> torch.fx.Proxy:
    """Under ``torch.fx`` symbolic tracing: record ``module`` as one ``call_module`` node, as fx does
    for torch.nn's own layers (it traces into classes defined elsewhere). Keeps BN folding
    (`marginface.deploy.fold`) and the PReLU rewrite working on models built with these layers."""
    tracer = x.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (x,), {})


def _use_fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if not (x.requires_grad or weight.requires_grad):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return not torch.onnx.is_in_onnx_export()


class PReLU(nn.PReLU):
    """``nn.PReLU`` with a fast CPU backward (see the module docstring); a drop-in replacement."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch
            return F.prelu(x, self.weight)
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        if _use_fast_path(x, self.weight):
            return _PReLUFunction.apply(x, self.weight)
        return F.prelu(x, self.weight)


THIN_GROUP_WIDTH = 8  # input channels per group that oneDNN's bf16 kernels run well


def regrouped_weight(weight: torch.Tensor, groups: int, channels_per_group: int) -> tuple[torch.Tensor, int]:
    """``(weight, groups)`` of the same grouped convolution as fewer, wider groups of
    ``channels_per_group`` input channels: each original group's filters on the block diagonal,
    zeros elsewhere, so the outputs are identical. Differentiable: the gradient reaches only the
    original entries (the zeros are built anew each call and never trained). Returned unchanged for
    dense and depthwise convolutions, groups already that wide, and when no even merge exists."""
    out_channels, in_per_group = weight.shape[:2]
    merge = channels_per_group // in_per_group  # original groups per new group
    if groups == 1 or in_per_group == 1 or merge < 2 or channels_per_group % in_per_group or groups % merge:
        return weight, groups
    # original group g = filter // out_per_group sits in block g % merge of new group g // merge
    block = (torch.arange(out_channels, device=weight.device) // (out_channels // groups)) % merge
    mask = (torch.arange(merge, device=weight.device) == block[:, None]).to(weight.dtype)
    wide = weight.unsqueeze(1) * mask.view(out_channels, merge, *([1] * (weight.dim() - 1)))
    return wide.reshape(out_channels, merge * in_per_group, *weight.shape[2:]), groups // merge


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that avoids oneDNN's slow bf16 kernels for some grouped convolutions under CPU
    bf16 autocast: thin stride-1 groups (2-7 channels per group, `mbf`'s stem) run as groups of
    `THIN_GROUP_WIDTH` with zero blocks (fwd+bwd of mbf's stem at batch 64: 126 ms, against 334 ms
    in fp32 and 228 ms as thin bf16 groups), and strided depthwise ones in fp32 (their bf16 input
    gradient takes ~150 ms for a 64×128×56×56 map, 4-36 ms in fp32). Dense and stride-1 depthwise
    convolutions stay plain bf16. Same parameters and state_dict as ``nn.Conv2d``; outside CPU
    autocast it is exactly ``nn.Conv2d``. Measured in docs/performance.md.
    """

    @property
    def thin_groups(self) -> bool:
        return self.groups > 1 and 1 < self.in_channels // self.groups < THIN_GROUP_WIDTH

    @property
    def fp32_under_cpu_autocast(self) -> bool:
        return self.groups > 1 and (max(self.stride) > 1 or self.thin_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch
            return self._conv_forward(x, self.weight, self.bias)
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        if (x.device.type == "cpu" and self.fp32_under_cpu_autocast and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            if self.thin_groups and max(self.stride) == 1 and self.padding_mode == "zeros":
                weight, groups = regrouped_weight(self.weight, self.groups, THIN_GROUP_WIDTH)
                if groups != self.groups:
                    return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, groups)
            with torch.autocast("cpu", enabled=False):
                return self._conv_forward(x.float(), self.weight, self.bias)
        return self._conv_forward(x, self.weight, self.bias)


def _swap_class(model: nn.Module, pairs: tuple, enabled: bool) -> int:
    """Switch modules between a stock class and its fast subclass in place (only the class changes:
    parameters, buffers, hooks and state_dict keys stay). Returns how many were switched."""
    count = 0
    for module in model.modules():
        for stock, fast in pairs:
            if type(module) in (stock, fast):
                target = fast if enabled else stock
                if type(module) is not target:
                    module.__class__ = target
                    count += 1
    return count


def set_fast_prelu(model: nn.Module, enabled: bool = True) -> int:
    """Every PReLU of ``model`` to the fast layer (``enabled``) or to the stock ``nn.PReLU``."""
    return _swap_class(model, ((nn.PReLU, PReLU),), enabled)


def set_fast_conv(model: nn.Module, enabled: bool = True) -> int:
    """Every Conv2d of ``model`` to `Conv2d` (grouped ones in fp32 under CPU autocast) or to ``nn.Conv2d``."""
    return _swap_class(model, ((nn.Conv2d, Conv2d),), enabled)


def set_fast_layers(model: nn.Module, enabled: bool = True) -> int:
    """Both switches (``train.fast_layers``); the backbones are built with the fast layers on."""
    return set_fast_prelu(model, enabled) + set_fast_conv(model, enabled)
