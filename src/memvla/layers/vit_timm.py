"""A ViT in timm's layout: the towers OpenVLA stores (DINOv2 ViT-L/14 with 4 register
tokens, SigLIP So400m/14) under timm's ``VisionTransformer`` names.

``patch_embed.proj`` (conv), ``pos_embed`` (1, P, D) over the patches only, optional
prefix tokens ``cls_token`` (1, 1, D) and ``reg_token`` (1, R, D) put before the patches
after the position embedding, pre-LayerNorm ``blocks.{i}`` (``norm1``, ``attn.qkv`` one
fused projection, ``attn.proj``, optional LayerScale ``ls1.scale_factor``, ``norm2``,
``mlp.fc1``/``fc2``, ``ls2``), the final ``norm`` and SigLIP's attention-pool head
``attn_pool`` (``latent``, ``q``, ``kv``, ``proj``, ``norm``, ``mlp``). OpenVLA renames
timm's LayerScale ``gamma`` to ``scale_factor`` and reads the second-to-last block's
patch tokens (``feature_layer=1``: the last block, the norm and the pool head are stored
but never read; :meth:`TimmViT.unused_parameter_names`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import merge_heads, scaled_attention
from .mlp import MLP
from .vision import check_tower_images, key_mask, patchify_conv


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale_factor = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale_factor


class TimmAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normed tokens (B, N, D) -> queries, keys, values (B, Hh, N, Dh) each (one fused
        projection)."""
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads)  # (B, N, 3, Hh, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, Hh, N, Dh) each
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None = None
               ) -> Tensor:
        """Queries (B, Hh, N, Dh) over keys / values (B, Hh, L, Dh) -> (B, N, D): every
        key, or those where ``key_valid`` (B, L) bool is True."""
        return self.proj(merge_heads(scaled_attention(q, k, v, key_mask(q, k, key_valid))))

    def forward(self, x: Tensor, key_valid: Tensor | None = None) -> Tensor:
        return self.attend(*self.project(x), key_valid)  # (B, N, D)


class TimmBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float, act: str,
                 layer_scale: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = TimmAttention(width, heads)
        self.ls1 = LayerScale(width) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, act)
        self.ls2 = LayerScale(width) if layer_scale else nn.Identity()

    def forward(self, x: Tensor, key_valid: Tensor | None = None) -> Tensor:
        """``key_valid`` (B, N) bool: the tokens attended to (default every one)."""
        return self.finish(x, *self.attention_inputs(x), key_valid)

    def attention_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens (B, N, D) -> their queries, keys, values (B, Hh, N, Dh) each."""
        return self.attn.project(self.norm1(x))

    def finish(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor,
               key_valid: Tensor | None = None) -> Tensor:
        """The block's output (B, N, D) for tokens ``x`` whose queries are ``q``, attending
        to keys / values ``k``, ``v`` (B, Hh, L, Dh) (as
        :meth:`memvla.layers.vision.VisionBlock.finish`)."""
        x = x + self.ls1(self.attn.attend(q, k, v, key_valid))  # (B, N, D)
        return x + self.ls2(self.mlp(self.norm2(x)))  # (B, N, D)


class AttentionPool(nn.Module):
    """SigLIP's attention-pool head (timm's ``MAP`` pooling): its weights only, which a VLA
    reading patch tokens never uses."""

    def __init__(self, width: int, mlp_dim: int, eps: float, act: str):
        super().__init__()
        self.latent = nn.Parameter(torch.zeros(1, 1, width))
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, act)


class TimmViT(nn.Module):
    """images (B, C, H, W) in [-1, 1] -> patch features (B, P, D) of block
    ``depth − 1 − feature_layer`` (then the final norm iff ``feature_layer`` is 0)."""

    def __init__(self, width: int, depth: int, heads: int, mlp_dim: int, image_size: int,
                 patch_size: int, channels: int = 3, eps: float = 1e-6, act: str = "gelu",
                 class_token: bool = False, reg_tokens: int = 0, layer_scale: bool = False,
                 attn_pool: bool = False, feature_layer: int = 0,
                 pixel_mean: tuple[float, ...] | None = None,
                 pixel_std: tuple[float, ...] | None = None):
        super().__init__()
        self.image_size, self.channels, self.patch_size = image_size, channels, patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.feature_layer = feature_layer
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(channels, width, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, width)) if reg_tokens \
            else None
        self.num_prefix = int(class_token) + reg_tokens
        self.blocks = nn.ModuleList(TimmBlock(width, heads, mlp_dim, eps, act, layer_scale)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=eps)
        self.attn_pool = AttentionPool(width, mlp_dim, eps, act) if attn_pool else None
        # numbers, not buffers: not in the checkpoint, not built on the meta device
        self.pixel_norm = None if pixel_mean is None else (tuple(pixel_mean), tuple(pixel_std))

    def unused_parameter_names(self) -> set[str]:
        """What the patch features never read: blocks after the feature layer, the final
        norm when the feature layer is not the last, the pool head."""
        n = len(self.blocks) - self.feature_layer
        unused = {f"blocks.{i}." for i in range(n, len(self.blocks))}
        unused |= {"attn_pool."} | ({"norm."} if self.feature_layer else set())
        return {name for name, _ in self.named_parameters()
                if any(name.startswith(u) for u in unused)}

    # the tower in stages, as memvla.layers.vision.VisionTransformer's
    @property
    def side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def feature_blocks(self) -> list[TimmBlock]:
        """The blocks the features read (up to the feature layer)."""
        return list(self.blocks[: len(self.blocks) - self.feature_layer])

    def stem(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) in [-1, 1] -> the first block's input: the prefix tokens,
        then the patches (B, n_prefix + P, D)."""
        check_tower_images(images, self.channels, self.image_size)
        x = images
        if self.pixel_norm is not None:  # [-1, 1] -> [0, 1] -> (x − mean) / std
            mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
                         for v in self.pixel_norm)  # (1, C, 1, 1)
            x = ((x + 1) / 2 - mean) / std  # (B, C, H, W)
        w = self.patch_embed.proj
        x = patchify_conv(x, w.weight, w.bias, self.patch_size) + self.pos_embed  # (B, P, D)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token)
                  if t is not None]  # (B, 1, D), (B, R, D)
        return torch.cat([*prefix, x], 1)  # (B, n_prefix + P, D)

    def head(self, x: Tensor) -> Tensor:
        """The feature layer's output (B, n_prefix + N, D) -> its patch features (B, N, D)
        (the final norm when the feature layer is the last)."""
        if self.feature_layer == 0:
            x = self.norm(x)
        return x[:, self.num_prefix:]  # (B, N, D)

    def forward(self, images: Tensor) -> Tensor:
        x = self.stem(images)  # (B, n_prefix + P, D)
        for block in self.feature_blocks:
            x = block(x)  # (B, n_prefix + P, D)
        return self.head(x)  # (B, P, D)
