"""Vision Transformers for faces as insightface's arcface_torch trains them (``vit_t``, ``vit_s``, ``vit_b``).

The architecture (facts from arcface_torch ``backbones/vit.py`` and ``get_model``):

- 112×112 input cut into 9×9 patches by a stride-9 conv: a 12×12 grid of 144 tokens (the last
  4 pixel rows and columns fall outside the grid), plus a learnt position embedding; no class token.
- ``depth`` pre-norm blocks: LayerNorm -> multi-head self-attention (qkv without bias, 8 heads) ->
  residual; LayerNorm -> MLP (ratio 4, ReLU6) -> residual; stochastic depth (drop path) rising
  linearly from 0 to ``drop_path`` (0.1) over the blocks.
- While training, a random ``mask_ratio`` (0.1) of the tokens is dropped before the blocks and
  replaced by a learnt mask token after the final LayerNorm (in the tokens' original order).
- The feature head flattens all 144 tokens: Linear(144·C -> C, no bias) -> BN1d -> Linear(C -> 512,
  no bias) -> BN1d (eps 2e-5).

========  =======  =====  =====  ======================================
name      width C  depth  heads  published size (arcface_torch README)
========  =======  =====  =====  ======================================
vit_t     256      12     8      ViT-T-1.5G
vit_s     512      12     8      (5.7 GMACs by the same count)
vit_b     512      24     8      ViT-B-11G
========  =======  =====  =====  ======================================

Those "G" figures include the attention products (Q·Kᵀ and A·V), which `count_macs` adds through
`Attention.matmul_macs`. Module and tensor names are arcface_torch's (``patch_embed.proj``,
``pos_embed``, ``mask_token``, ``blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``, ``feature.0..3``), so its ``backbone.pth`` files load as they are. Other input sides work
(the grid is ``input_size // 9`` per side); the position embedding and the head follow the grid.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# name -> (width, depth, heads)
VIT_CONFIGS = {"vit_t": (256, 12, 8), "vit_s": (512, 12, 8), "vit_b": (512, 24, 8)}
PATCH_SIZE = 9
MLP_RATIO = 4
FEATURE_BN_EPS = 2e-5


def patch_grid(input_size: int) -> int:
    """Patches per side: a stride-``PATCH_SIZE`` conv without padding keeps ``input_size // 9``."""
    return input_size // PATCH_SIZE


class DropPath(nn.Module):
    """Stochastic depth: while training, zero a sample's residual branch with probability ``rate``
    and scale the kept ones by ``1 / (1 - rate)``."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = q.float(), k.float(), v.float()  # the products in fp32 even under autocast, as arcface_torch does
        # written out rather than F.scaled_dot_product_attention: ONNX opset 13 (our export) has no fused
        # attention, and graph rewrites (BatchNorm folding) trace this once for every use
        out = torch.softmax((q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5), dim=-1) @ v
        return self.proj(out.to(x.dtype).transpose(1, 2).reshape(batch, tokens, dim))

    @staticmethod
    def matmul_macs(output: torch.Tensor) -> int:
        """Multiply-accumulates of Q·Kᵀ and A·V for one sample: 2 · tokens² · width."""
        tokens, dim = output.shape[-2], output.shape[-1]
        return 2 * tokens * tokens * dim


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * MLP_RATIO)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH_SIZE, PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # N × tokens × width


class VisionTransformer(nn.Module):
    """Float N×3×S×S -> un-normalised N×embedding_size (see the module doc)."""

    def __init__(self, width: int, depth: int, heads: int, embedding_size: int, input_size: int,
                 drop_path: float = 0.1, mask_ratio: float = 0.1, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.embedding_size, self.input_size = embedding_size, input_size
        self.mask_ratio = float(mask_ratio)
        self.gradient_checkpointing = gradient_checkpointing
        tokens = patch_grid(input_size) ** 2
        self.patch_embed = PatchEmbed(width)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(width, heads, rate) for rate in rates)
        self.norm = nn.LayerNorm(width)
        self.feature = nn.Sequential(
            nn.Linear(width * tokens, width, bias=False), nn.BatchNorm1d(width, eps=FEATURE_BN_EPS),
            nn.Linear(width, embedding_size, bias=False), nn.BatchNorm1d(embedding_size, eps=FEATURE_BN_EPS))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def _masking(self) -> bool:
        return self.training and self.mask_ratio > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        batch, tokens, width = x.shape
        kept = None
        if self._masking():
            keep = max(1, int(tokens * (1.0 - self.mask_ratio)))
            kept = torch.rand(batch, tokens, device=x.device).argsort(dim=1)[:, :keep]
            x = x.gather(1, kept[..., None].expand(-1, -1, width))
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x.float())
        if kept is not None:  # dropped tokens come back as the mask token, in their own places
            full = self.mask_token.to(x.dtype).expand(batch, tokens, width)
            x = full.scatter(1, kept[..., None].expand(-1, -1, width), x)
        return self.feature(x.reshape(batch, tokens * width))


def build_vit(name: str, embedding_size: int, input_size: int, drop_path: float = 0.1, mask_ratio: float = 0.1,
              gradient_checkpointing: bool = False) -> VisionTransformer:
    """``vit_t`` / ``vit_s`` / ``vit_b`` (`VIT_CONFIGS`); ``drop_path`` and ``mask_ratio`` act only in training."""
    width, depth, heads = VIT_CONFIGS[name]
    return VisionTransformer(width, depth, heads, embedding_size, input_size, drop_path=drop_path,
                             mask_ratio=mask_ratio, gradient_checkpointing=gradient_checkpointing)
