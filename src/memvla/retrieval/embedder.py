"""A fixed embedding of an observation and its instruction for the experience store.

No learned weights, so that a store stays valid whatever policy reads it and however it is
trained: the instruction as signed feature hashing of its words and character trigrams
(``text_dim`` values), each camera's image area-averaged to ``grid × grid`` pixels
(3·grid² values, centred), the two parts L2-normalised and weighted (``image_weight``),
the whole L2-normalised. Inner products of embeddings are then cosine similarities. The
embedder's identity (:meth:`ObservationEmbedder.spec`) is stored with a store, and a store
built by another one is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "hash-pool-v1"


def _bucket(token: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
    return h % dim, 1.0 if (h >> 63) & 1 else -1.0


def text_features(texts: list[str], dim: int) -> Tensor:
    """Instructions -> (B, dim): hashed words and character trigrams, L2-normalised."""
    out = torch.zeros(len(texts), dim)
    for i, text in enumerate(texts):
        words = text.lower().split()
        grams = [w[j:j + 3] for w in (f"#{w}#" for w in words) for j in range(len(w) - 2)]
        for token in [f"w:{w}" for w in words] + [f"g:{g}" for g in grams]:
            j, sign = _bucket(token, dim)
            out[i, j] += sign
    return F.normalize(out, dim=-1)  # (B, dim)


def image_features(images: Tensor, grid: int) -> Tensor:
    """uint8 images (B, H, W, C) (or float (B, C, H, W) in [0, 1]) -> (B, C·grid²):
    area-averaged to grid × grid, centred, L2-normalised."""
    x = images.permute(0, 3, 1, 2).float() / 255 if images.dtype == torch.uint8 else \
        images.float()  # (B, C, H, W)
    small = F.adaptive_avg_pool2d(x, grid).flatten(1)  # (B, C·grid²)
    return F.normalize(small - small.mean(1, keepdim=True), dim=-1)


@dataclass(frozen=True)
class ObservationEmbedder:
    text_dim: int = 256
    grid: int = 8
    channels: int = 3
    cameras: int = 1
    image_weight: float = 1.0

    @property
    def dim(self) -> int:
        return self.text_dim + self.cameras * self.channels * self.grid ** 2

    @classmethod
    def from_spec(cls, spec: dict) -> ObservationEmbedder:
        """The embedder a store's spec describes (an unknown embedder is refused)."""
        if spec.get("name") != NAME:
            raise ValueError(f"experience store: embedder {spec.get('name')!r} is not one "
                             f"this version has ({NAME!r})")
        fields = {k: spec[k] for k in cls.__dataclass_fields__ if k in spec}
        return cls(**fields)

    def spec(self) -> dict:
        """What a store records of its embedder (and compares on load)."""
        return {"name": NAME, **asdict(self), "dim": self.dim}

    def __call__(self, images: list[Tensor], tasks: list[str]) -> Tensor:
        """Images per camera (B, H, W, C) and B instructions -> embeddings (B, dim)."""
        if len(images) != self.cameras:
            raise ValueError(f"embedder: expected {self.cameras} camera(s), got {len(images)}")
        parts = [text_features(tasks, self.text_dim)]
        parts += [self.image_weight * image_features(img, self.grid) / self.cameras ** 0.5
                  for img in images]
        return F.normalize(torch.cat(parts, 1), dim=-1)  # (B, dim)
