"""How big a backbone is: width scaling, final feature-map size, parameter and MAC counts.

MACs (multiply-accumulates) of one image are what face-recognition papers call "MAdds" or,
loosely, "FLOPs" (MobileFaceNet's 221M, insightface's "mbf 0.45G"). We count only the
multiplications of Conv2d and Linear layers:

- Conv2d: output elements × (in_channels / groups) × kernel_h × kernel_w
- Linear: output elements × in_features

- a module with a ``matmul_macs(output)`` method (a transformer's attention: Q·Kᵀ and A·V, which
  have no weights) adds what it returns for one sample's output.

Biases, BatchNorm, LayerNorm, PReLU/ReLU, residual additions, pooling, softmax and squeeze-excitation
gating are not counted: they are cheap next to the convolutions and the published numbers leave them out too.
"""
from __future__ import annotations

import torch
from torch import nn

STRIDE_2_STEPS = 4  # every backbone here halves the map four times (total stride 16)


def round_channels(channels: float, width_mult: float = 1.0, divisor: int = 8) -> int:
    """`channels × width_mult` rounded to the nearest multiple of `divisor` (at least `divisor`).

    Multiples of 8 keep vectorised kernels and tensor cores fully used.
    """
    scaled = channels * width_mult
    return max(divisor, int(scaled + divisor / 2) // divisor * divisor)


def final_map_size(input_size: int) -> int:
    """Side of the last feature map: each stride-2 conv (odd kernel, `kernel // 2` padding) maps
    n to ceil(n / 2), so 112 -> 7, 64 -> 4 and 56 -> 4."""
    size = input_size
    for _ in range(STRIDE_2_STEPS):
        size = (size + 1) // 2
    return size


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (frozen ones included unless `trainable_only`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_size: int | None = None) -> int:
    """Multiply-accumulates of one `3×input_size×input_size` image (see the module docstring).

    `input_size` defaults to the model's own `input_size` attribute (else 112). The model runs once
    in eval mode without gradients (its train/eval flags are restored); it also works on the
    "meta" device, which makes counting huge models free.
    """
    size = input_size if input_size is not None else getattr(model, "input_size", 112)
    total = 0

    def add_conv(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    def add_linear(module: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output[0].numel() * module.in_features

    def add_matmuls(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += int(module.matmul_macs(output[0]))

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(add_conv))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(add_linear))
        if callable(getattr(module, "matmul_macs", None)):
            hooks.append(module.register_forward_hook(add_matmuls))

    first = next(model.parameters())
    training_flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=first.device, dtype=first.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        for module, flag in training_flags.items():
            module.training = flag
    return total
