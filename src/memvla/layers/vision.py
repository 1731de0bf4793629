"""A ViT vision encoder of the SigLIP family: patch embedding (conv), learned position
embedding, pre-LayerNorm blocks with biased attention and a GELU-tanh MLP, and a final
LayerNorm. Module names follow Hugging Face's SigLIP vision tower."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import merge_heads, scaled_attention, split_heads
from .mlp import MLP


def patchify_conv(images: Tensor, weight: Tensor, bias: Tensor | None, patch: int) -> Tensor:
    """images (B, C, H, W) -> patch features (B, P, D), row-major over the patch grid."""
    x = nn.functional.conv2d(images, weight, bias, stride=patch)  # (B, D, H/p, W/p)
    return x.flatten(2).transpose(1, 2)  # (B, P, D)


def bucketed_positions(side: int, device=None) -> Tensor:
    """SmolVLM's position ids of a full side × side patch grid (P,): each coordinate
    i / side · (1 − 1e-6) bucketed against 1/side, 2/side, ... (right-closed), in float32
    as transformers does, so that rows and columns run 0, 0, 1, ..., side − 2."""
    bounds = torch.arange(1 / side, 1.0, 1 / side, device=device)  # (side − 1,)
    frac = torch.arange(side, dtype=torch.float32, device=device) / side * (1 - 1e-6)
    rows = torch.bucketize(frac, bounds, right=True)  # (side,)
    return (rows[:, None] * side + rows[None, :]).flatten()  # (P,)


class VisionEmbeddings(nn.Module):
    def __init__(self, width: int, image_size: int, patch_size: int, channels: int = 3,
                 position_buckets: bool = False):
        super().__init__()
        self.side = image_size // patch_size
        self.position_buckets = position_buckets
        if image_size % patch_size:
            raise ValueError(f"vision: image_size {image_size} is not a multiple of "
                             f"patch_size {patch_size}")
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embedding = nn.Conv2d(channels, width, patch_size, stride=patch_size)
        self.position_embedding = nn.Embedding(self.num_patches, width)

    def forward(self, images: Tensor) -> Tensor:
        x = patchify_conv(images, self.patch_embedding.weight, self.patch_embedding.bias,
                          self.patch_size)  # (B, P, D)
        pos = self.position_embedding.weight  # (P, D)
        if self.position_buckets:
            pos = pos[bucketed_positions(self.side, pos.device)]  # (P, D)
        return x + pos[None]  # (B, P, D)


def key_mask(q: Tensor, k: Tensor, key_valid: Tensor | None) -> Tensor:
    """The attention mask (B, N, L) bool of queries (B, Hh, N, Dh) over keys (B, Hh, L, Dh):
    every key, or those where ``key_valid`` (B, L) is True."""
    b, n, length = q.shape[0], q.shape[2], k.shape[2]
    if key_valid is None:
        return q.new_ones(b, n, length, dtype=torch.bool)  # (B, N, L)
    return key_valid[:, None, :].expand(b, n, length)  # (B, N, L)


class VisionAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"vision: width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normed tokens (B, N, D) -> queries, keys, values (B, Hh, N, Dh) each."""
        return tuple(split_heads(p(x), self.heads)
                     for p in (self.q_proj, self.k_proj, self.v_proj))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None = None
               ) -> Tensor:
        """Queries (B, Hh, N, Dh) over the keys / values (B, Hh, L, Dh) -> (B, N, D): every
        key, or those where ``key_valid`` (B, L) bool is True."""
        return self.out_proj(merge_heads(scaled_attention(q, k, v, key_mask(q, k, key_valid))))

    def forward(self, x: Tensor, key_valid: Tensor | None = None) -> Tensor:
        return self.attend(*self.qkv(x), key_valid)  # (B, P, D)


class VisionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float, act: str):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = VisionAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(self, x: Tensor, key_valid: Tensor | None = None) -> Tensor:
        """``key_valid`` (B, N) bool: the tokens attended to (default every one)."""
        return self.finish(x, *self.attention_inputs(x), key_valid)

    def attention_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens (B, N, D) -> their queries, keys, values (B, Hh, N, Dh) each."""
        return self.self_attn.qkv(self.layer_norm1(x))

    def finish(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor,
               key_valid: Tensor | None = None) -> Tensor:
        """The block's output (B, N, D) for tokens ``x`` (B, N, D) whose normed queries are
        ``q`` (B, Hh, N, Dh), attending to keys / values ``k``, ``v`` (B, Hh, L, Dh) (their
        own, or others' too: :mod:`memvla.layers.vision_reuse`; ``key_valid`` (B, L) bool
        masks some out)."""
        x = x + self.self_attn.attend(q, k, v, key_valid)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """Holds ``layers`` (the ``encoder`` of HF SigLIP)."""

    def __init__(self, depth: int, **block):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(**block) for _ in range(depth))


class VisionTransformer(nn.Module):
    """images (B, C, H, W) in [-1, 1] -> patch features (B, P, D)."""

    def __init__(self, width: int, depth: int, heads: int, mlp_dim: int, image_size: int,
                 patch_size: int, channels: int = 3, eps: float = 1e-6,
                 act: str = "gelu_tanh", position_buckets: bool = False):
        super().__init__()
        self.image_size = image_size
        self.channels = channels
        self.embeddings = VisionEmbeddings(width, image_size, patch_size, channels,
                                           position_buckets)
        self.encoder = VisionEncoder(depth, width=width, heads=heads, mlp_dim=mlp_dim,
                                     eps=eps, act=act)
        self.post_layernorm = nn.LayerNorm(width, eps=eps)

    @property
    def num_patches(self) -> int:
        return self.embeddings.num_patches

    # the tower in stages, which memvla.layers.vision_drop cuts between blocks (as
    # memvla.layers.vit_timm.TimmViT): stem -> feature_blocks -> head
    num_prefix = 0  # tokens before the patches (none)

    @property
    def side(self) -> int:
        return self.embeddings.side

    @property
    def patch_size(self) -> int:
        return self.embeddings.patch_size

    @property
    def feature_blocks(self) -> list[VisionBlock]:
        """The blocks the features read (every one)."""
        return list(self.encoder.layers)

    def stem(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) -> the first block's input (B, P, D)."""
        check_tower_images(images, self.channels, self.image_size)
        return self.embeddings(images)  # (B, P, D)

    def head(self, x: Tensor) -> Tensor:
        """The last block's output (B, P, D) -> the patch features (B, P, D)."""
        return self.post_layernorm(x)

    def forward(self, images: Tensor) -> Tensor:
        x = self.stem(images)  # (B, P, D)
        for layer in self.feature_blocks:
            x = layer(x)
        return self.head(x)  # (B, P, D)


def check_tower_images(images: Tensor, channels: int, size: int) -> None:
    want = (channels, size, size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"vision: images must be (B, {want[0]}, {want[1]}, {want[2]}), "
                         f"got {tuple(images.shape)}")


@dataclass
class ImageEncoder:
    """A model's image path as a callable: vision tower, connector (pixel shuffle and
    projection, or an MLP projector) and the embedding scale. ``project`` takes patch
    features from the tower (B, P, Dv) (e.g. of a space-time encoder over the same tower);
    a temporal context encodes past frames with it as the model encodes the current one."""

    vision: VisionTransformer | nn.Module
    connector: nn.Module
    scale: float = 1.0

    def project(self, feats: Tensor) -> Tensor:
        tokens = self.connector(feats)  # (B, Ti, D)
        return tokens * self.scale if self.scale != 1.0 else tokens

    def __call__(self, images: Tensor) -> Tensor:
        return self.project(self.vision(images))  # (B, Ti, D)
