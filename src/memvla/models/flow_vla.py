"""The flow-matching VLA (SmolVLA / π0 family).

Prefix = image tokens of every camera + language tokens (+ the state token, SmolVLA);
suffix = (+ the state token, π0) the action chunk. A VLM backbone runs over the prefix
and fills a :class:`KVCache`; the action expert runs over the suffix and reads the cached
prefix keys/values: jointly over [prefix; suffix] in every ``self_attn_every_n_layers``-th
layer, by cross-attention to the prefix alone in the others. Training uses the same two
passes (the suffix never influences the prefix, so this equals joint attention).

Time convention (see :mod:`memvla.layers.flow_matching`): t = 1 is noise, t = 0 is data,
``x_t = t·noise + (1−t)·actions``, the model predicts ``v ≈ noise − actions`` and
sampling integrates from t = 1 to t = 0 with ``num_steps`` Euler steps, reusing the
prefix cache at every step.

Module names mirror LeRobot's SmolVLA (``vlm_with_expert.vlm.model.{vision_model,
connector, text_model}``, ``vlm_with_expert.lm_expert``, ``state_proj``,
``action_in_proj``, ``action_out_proj``, ``action_time_mlp_in/out``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs import FlowVLAConfig
from ..layers.connector import Connector
from ..layers.flow_matching import (
    action_time_embed,
    euler_sample,
    interpolate,
    sample_time,
    target_velocity,
)
from ..layers.kv_cache import KVCache
from ..layers.masks import block_mask_between
from ..layers.vision import VisionTransformer
from .decoder import Decoder


@dataclass
class TokenSegment:
    """A run of tokens: embeddings (B, N, D), real-token flags (B, N) bool and block
    flags (B, N) (1 starts a new attention block)."""

    embs: Tensor
    pad: Tensor
    flags: Tensor

    @staticmethod
    def cat(parts: list[TokenSegment]) -> TokenSegment:
        return TokenSegment(torch.cat([p.embs for p in parts], 1),  # (B, N, D)
                            torch.cat([p.pad for p in parts], 1),  # (B, N)
                            torch.cat([p.flags for p in parts], 1))  # (B, N)

    @staticmethod
    def full(embs: Tensor, first_flag: int, rest_flag: int) -> TokenSegment:
        b, n, _ = embs.shape
        flags = torch.full((b, n), rest_flag, dtype=torch.long, device=embs.device)
        flags[:, 0] = first_flag
        return TokenSegment(embs, torch.ones(b, n, dtype=torch.bool, device=embs.device), flags)


class VLMInner(nn.Module):
    def __init__(self, cfg: FlowVLAConfig):
        super().__init__()
        v = cfg.vision
        self.vision_model = VisionTransformer(v.width, v.depth, v.heads, v.mlp_dim, v.image_size,
                                              v.patch_size, v.channels, v.eps, v.act)
        self.connector = Connector(v.width, cfg.text.width, cfg.connector_scale,
                                   cfg.connector_bias)
        self.text_model = Decoder(cfg.text)


class VLM(nn.Module):
    def __init__(self, cfg: FlowVLAConfig):
        super().__init__()
        self.model = VLMInner(cfg)
        t = cfg.text
        self.lm_head = nn.Linear(t.width, t.vocab_size, bias=False) if t.lm_head else None


class VLMWithExpert(nn.Module):
    """The backbone over the prefix and the action expert over the suffix."""

    def __init__(self, cfg: FlowVLAConfig):
        super().__init__()
        self.cfg = cfg
        self.vlm = VLM(cfg)
        kv_src = cfg.text.kv_heads * cfg.text.head_dim
        kv_in = [None if cfg.is_joint_layer(i) else kv_src for i in range(cfg.expert.depth)]
        self.lm_expert = Decoder(cfg.expert, kv_in_dims=kv_in)

    @property
    def text_model(self) -> Decoder:
        return self.vlm.model.text_model

    def embed_images(self, images: Tensor) -> Tensor:
        """images (B, C, S, S) in [-1, 1] -> tokens (B, Ti, D)."""
        feats = self.vlm.model.vision_model(images)  # (B, P, Dv)
        return self.vlm.model.connector(feats)  # (B, Ti, D)

    def prefill(self, prefix: TokenSegment, cache: KVCache) -> Tensor:
        """Run the backbone over the prefix, appending to ``cache`` -> hidden (B, Np, D)."""
        offset = 0 if cache.is_empty else cache.key_pad.sum(1, keepdim=True)
        last_block = 0 if cache.is_empty else cache.key_block[:, -1:]
        pos = offset + torch.cumsum(prefix.pad.long(), 1) - 1  # (B, Np)
        block = last_block + torch.cumsum(prefix.flags.long(), 1)  # (B, Np)
        cache.append_tokens(prefix.pad, block, pos)
        mask = block_mask_between(block, prefix.pad, cache.key_block, cache.key_pad)  # (B,Np,L)
        return self.text_model(prefix.embs, pos, mask, cache)  # (B, Np, D)

    def expert(self, suffix: TokenSegment, cache: KVCache) -> Tensor:
        """Run the expert over the suffix, reading (not changing) the prefix cache.
        -> normed hidden states (B, Ns, De)."""
        offset = cache.key_pad.sum(1, keepdim=True)  # (B, 1) real prefix tokens
        pos = offset + torch.cumsum(suffix.pad.long(), 1) - 1  # (B, Ns)
        block = cache.key_block[:, -1:] + torch.cumsum(suffix.flags.long(), 1)  # (B, Ns)
        joint_mask = block_mask_between(block, suffix.pad,
                                        torch.cat([cache.key_block, block], 1),
                                        torch.cat([cache.key_pad, suffix.pad], 1))  # (B,Ns,L+Ns)
        cross_mask = block_mask_between(block, suffix.pad, cache.key_block, cache.key_pad)
        exp = self.lm_expert
        cos, sin = exp.rope(pos)  # (B, Ns, Dh)
        # cross-attention queries count positions from the start of the suffix
        cross_cos, cross_sin = exp.rope(pos - offset)  # (B, Ns, Dh)
        x = suffix.embs
        for i, layer in enumerate(exp.layers):
            k, v = cache.get(i)  # (B, Hkv, L, Dh)
            if self.cfg.is_joint_layer(i):
                x = layer(x, cos, sin, joint_mask, past=(k, v))
            else:
                x = layer.forward_cross(x, cross_cos, cross_sin, cross_mask, k, v)
        return exp.norm(x)  # (B, Ns, De)


class FlowMatchingVLA(nn.Module):
    def __init__(self, cfg: FlowVLAConfig):
        super().__init__()
        self.cfg = cfg
        d, de = cfg.text.width, cfg.expert.width
        self.vlm_with_expert = VLMWithExpert(cfg)
        self.state_proj = nn.Linear(cfg.max_state_dim, d if cfg.state_token == "prefix" else de)
        self.action_in_proj = nn.Linear(cfg.max_action_dim, de)
        self.action_out_proj = nn.Linear(de, cfg.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * de, de)
        self.action_time_mlp_out = nn.Linear(de, de)

    def unused_parameter_names(self) -> set[str]:
        """Parameters the action loss never reaches: the prefix's hidden states after the
        last backbone layer are not read (only its keys/values are), so that layer's query,
        output and MLP weights, the final backbone norm and the LM head get no gradient.
        They are kept so that checkpoints of the reference implementations load by name."""
        last = f"vlm_with_expert.vlm.model.text_model.layers.{self.cfg.text.depth - 1}."
        names = {n for n, _ in self.named_parameters()
                 if n.startswith(last) and ".k_proj." not in n and ".v_proj." not in n
                 and ".input_layernorm." not in n}
        names |= {n for n, _ in self.named_parameters()
                  if n.startswith(("vlm_with_expert.vlm.model.text_model.norm.",
                                   "vlm_with_expert.vlm.lm_head."))}
        return names

    # -- token construction ---------------------------------------------------------------
    def embed_prefix(self, images: list[Tensor], lang_ids: Tensor, lang_pad: Tensor,
                     state: Tensor) -> list[TokenSegment]:
        """The prefix as named parts (images per camera, language, state); a temporal
        context may insert its own parts before they are concatenated."""
        vwe, d = self.vlm_with_expert, self.cfg.text.width
        parts = []
        for img in images:
            emb = vwe.embed_images(img)  # (B, Ti, D)
            if self.cfg.scale_image_embeddings:
                emb = emb * math.sqrt(d)
            parts.append(TokenSegment.full(emb, 0, 0))
        lang = vwe.text_model.embed(lang_ids)  # (B, Nl, D)
        if self.cfg.scale_text_embeddings:
            lang = lang * math.sqrt(d)
        parts.append(TokenSegment(lang, lang_pad, torch.zeros_like(lang_ids)))
        if self.cfg.state_token == "prefix":
            parts.append(TokenSegment.full(self.state_proj(state)[:, None], 1, 1))  # (B, 1, D)
        return parts

    def embed_suffix(self, state: Tensor, x_t: Tensor, t: Tensor) -> TokenSegment:
        emb = action_time_embed(x_t, t, self.action_in_proj, self.action_time_mlp_in,
                                self.action_time_mlp_out, self.cfg.time_min_period,
                                self.cfg.time_max_period)  # (B, A, De)
        actions = TokenSegment.full(emb, 1, int(self.cfg.causal_actions))
        if self.cfg.state_token == "suffix":
            st = TokenSegment.full(self.state_proj(state)[:, None], 1, 1)  # (B, 1, De)
            return TokenSegment.cat([st, actions])
        return actions

    def _velocity(self, cache: KVCache, state: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        suffix = self.embed_suffix(state, x_t, t)
        h = self.vlm_with_expert.expert(suffix, cache)  # (B, Ns, De)
        return self.action_out_proj(h[:, -self.cfg.chunk_size:])  # (B, A, Da)

    # -- training -------------------------------------------------------------------------
    def prefill(self, images, lang_ids, lang_pad, state, cache: KVCache | None = None):
        cache = cache if cache is not None else KVCache(self.cfg.text.depth)
        prefix = TokenSegment.cat(self.embed_prefix(images, lang_ids, lang_pad, state))
        self.vlm_with_expert.prefill(prefix, cache)
        return cache

    def forward(self, images: list[Tensor], lang_ids: Tensor, lang_pad: Tensor, state: Tensor,
                actions: Tensor, noise: Tensor | None = None,
                time: Tensor | None = None) -> Tensor:
        """Flow-matching losses per element (B, A, Da): (v(x_t, t) − (noise − actions))².
        Inputs are normalised and padded to max_state_dim / max_action_dim."""
        b = actions.shape[0]
        noise = torch.randn_like(actions) if noise is None else noise
        if time is None:
            time = sample_time(b, self.cfg.time_alpha, self.cfg.time_beta, self.cfg.time_min,
                               device=actions.device)  # (B,)
        x_t = interpolate(actions, noise, time)  # (B, A, Da)
        cache = self.prefill(images, lang_ids, lang_pad, state)
        v = self._velocity(cache, state, x_t, time)  # (B, A, Da)
        return F.mse_loss(v, target_velocity(actions, noise), reduction="none")

    # -- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def sample_actions(self, images, lang_ids, lang_pad, state, noise: Tensor | None = None,
                       num_steps: int | None = None) -> Tensor:
        """Denoise an action chunk (B, A, Da): the prefix runs once into the cache, which
        every Euler step reuses."""
        noise = self._noise(state) if noise is None else noise
        cache = self.prefill(images, lang_ids, lang_pad, state)
        return euler_sample(lambda x, t: self._velocity(cache, state, x, t), noise,
                            num_steps or self.cfg.num_steps)

    @torch.no_grad()
    def sample_actions_uncached(self, images, lang_ids, lang_pad, state,
                                noise: Tensor | None = None,
                                num_steps: int | None = None) -> Tensor:
        """Slow twin of :meth:`sample_actions`: recomputes the prefix at every step."""
        noise = self._noise(state) if noise is None else noise

        def velocity(x, t):
            cache = self.prefill(images, lang_ids, lang_pad, state)
            return self._velocity(cache, state, x, t)

        return euler_sample(velocity, noise, num_steps or self.cfg.num_steps)

    def _noise(self, state: Tensor) -> Tensor:
        return torch.randn(state.shape[0], self.cfg.chunk_size, self.cfg.max_action_dim,
                           device=state.device, dtype=state.dtype)
