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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs import ContextConfig, FlowVLAConfig
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
from ..layers.memory_tokens import MemoryTokens
from ..layers.tokens import TokenSegment
from ..layers.vision import VisionTransformer
from .decoder import Decoder


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

    @staticmethod
    def prefix_layout(prefix: TokenSegment, cache: KVCache) -> tuple[Tensor, Tensor, Tensor]:
        """Positions (B, Np), block ids (B, Np) and attention mask (B, Np, L) of a prefix
        appended after what ``cache`` holds (L = cached + Np)."""
        offset = 0 if cache.is_empty else cache.key_pad.sum(1, keepdim=True)
        last_block = 0 if cache.is_empty else cache.key_block[:, -1:]
        pos = offset + torch.cumsum(prefix.pad.long(), 1) - 1  # (B, Np)
        block = last_block + torch.cumsum(prefix.flags.long(), 1)  # (B, Np)
        k_block, k_pad = block, prefix.pad
        if not cache.is_empty:
            k_block = torch.cat([cache.key_block, block], 1)  # (B, L)
            k_pad = torch.cat([cache.key_pad, prefix.pad], 1)  # (B, L)
        mask = block_mask_between(prefix.query_blocks(block), prefix.pad, k_block, k_pad)
        return pos, block, mask

    def prefill(self, prefix: TokenSegment, cache: KVCache) -> Tensor:
        """Run the backbone over the prefix, appending to ``cache`` -> hidden (B, Np, D)."""
        pos, block, mask = self.prefix_layout(prefix, cache)
        cache.append_tokens(prefix.pad, block, pos)
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
    """With ``context.kind = "memory_tokens"`` the prefix also holds recurrent memory tokens
    (:mod:`memvla.layers.memory_tokens`); ``prefill``, ``forward`` and ``sample_actions``
    then take the current memory (B, M, D) and return the next one beside their result
    (``None`` without memory)."""

    def __init__(self, cfg: FlowVLAConfig, context: ContextConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.context = context or ContextConfig()
        d, de = cfg.text.width, cfg.expert.width
        self.vlm_with_expert = VLMWithExpert(cfg)
        self.state_proj = nn.Linear(cfg.max_state_dim, d if cfg.state_token == "prefix" else de)
        self.action_in_proj = nn.Linear(cfg.max_action_dim, de)
        self.action_out_proj = nn.Linear(de, cfg.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * de, de)
        self.action_time_mlp_out = nn.Linear(de, de)
        self.memory_tokens = None
        if self.context.kind == "memory_tokens":
            c = self.context
            self.memory_tokens = MemoryTokens(c.num_tokens, d, c.layout, c.init_std)

    def initial_memory(self, batch: int) -> Tensor | None:
        return None if self.memory_tokens is None else self.memory_tokens.initial(batch)

    def unused_parameter_names(self) -> set[str]:
        """Parameters the action loss never reaches: the prefix's hidden states after the
        last backbone layer are not read (only its keys/values are), so that layer's query,
        output and MLP weights, the final backbone norm and the LM head get no gradient.
        They are kept so that checkpoints of the reference implementations load by name.
        Memory tokens read the prefix's outputs: then only the LM head is unused."""
        if self.memory_tokens is not None:
            return {n for n, _ in self.named_parameters()
                    if n.startswith("vlm_with_expert.vlm.lm_head.")}
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
                     state: Tensor, memory: Tensor | None = None) -> list[TokenSegment]:
        """The prefix as parts: [memory] + images per camera + language + state."""
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
        if memory is not None:
            if self.memory_tokens is None:
                raise ValueError("memory given to a model without memory tokens "
                                 "(context.kind is 'none')")
            parts = self.memory_tokens.insert(parts, memory)
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
    def prefill(self, images, lang_ids, lang_pad, state, memory: Tensor | None = None,
                cache: KVCache | None = None) -> tuple[KVCache, Tensor | None]:
        """Run the backbone over the prefix -> (filled cache, next memory or None)."""
        cache = cache if cache is not None else KVCache(self.cfg.text.depth)
        prefix = TokenSegment.cat(self.embed_prefix(images, lang_ids, lang_pad, state, memory))
        hidden = self.vlm_with_expert.prefill(prefix, cache)  # (B, Np, D)
        new_memory = None if memory is None else self.memory_tokens.extract(hidden)
        return cache, new_memory

    def forward(self, images: list[Tensor], lang_ids: Tensor, lang_pad: Tensor, state: Tensor,
                actions: Tensor, noise: Tensor | None = None, time: Tensor | None = None,
                memory: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Flow-matching losses per element (B, A, Da): (v(x_t, t) − (noise − actions))²,
        and the next memory. Inputs are normalised and padded to max_state_dim /
        max_action_dim."""
        b = actions.shape[0]
        noise = torch.randn_like(actions) if noise is None else noise
        if time is None:
            time = sample_time(b, self.cfg.time_alpha, self.cfg.time_beta, self.cfg.time_min,
                               device=actions.device)  # (B,)
        x_t = interpolate(actions, noise, time)  # (B, A, Da)
        cache, new_memory = self.prefill(images, lang_ids, lang_pad, state, memory)
        v = self._velocity(cache, state, x_t, time)  # (B, A, Da)
        return F.mse_loss(v, target_velocity(actions, noise), reduction="none"), new_memory

    # -- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def sample_actions(self, images, lang_ids, lang_pad, state, noise: Tensor | None = None,
                       num_steps: int | None = None,
                       memory: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Denoise an action chunk (B, A, Da): the prefix runs once into the cache, which
        every Euler step reuses. Returns (actions, next memory or None)."""
        noise = self._noise(state) if noise is None else noise
        cache, new_memory = self.prefill(images, lang_ids, lang_pad, state, memory)
        actions = euler_sample(lambda x, t: self._velocity(cache, state, x, t), noise,
                               num_steps or self.cfg.num_steps)
        return actions, new_memory

    @torch.no_grad()
    def sample_actions_uncached(self, images, lang_ids, lang_pad, state,
                                noise: Tensor | None = None, num_steps: int | None = None,
                                memory: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Slow twin of :meth:`sample_actions`: recomputes the prefix at every step."""
        noise = self._noise(state) if noise is None else noise

        def velocity(x, t):
            cache, _ = self.prefill(images, lang_ids, lang_pad, state, memory)
            return self._velocity(cache, state, x, t)

        actions = euler_sample(velocity, noise, num_steps or self.cfg.num_steps)
        return actions, self.prefill(images, lang_ids, lang_pad, state, memory)[1]

    def _noise(self, state: Tensor) -> Tensor:
        return torch.randn(state.shape[0], self.cfg.chunk_size, self.cfg.max_action_dim,
                           device=state.device, dtype=state.dtype)
