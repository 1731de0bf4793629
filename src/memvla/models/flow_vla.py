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

With ``pruner.enabled`` LightVLA's token pruner (:mod:`memvla.layers.token_pruner`) sits
in the prefix: it prunes the image tokens of all cameras together, with the language tokens
(padding masked) and the ``pruner.action_context`` keys as its task. Every prefix token
keeps the RoPE position it has without pruning (kept image tokens their original ones,
later tokens theirs), so training (full length) and inference (pruned) agree; the suffix
continues after the largest cached position. Action contexts:

- ``none``: the language tokens only.
- ``placeholders`` (option A of the source notes): the noisy actions, projected to the
  backbone width, are appended to the prefix as tokens the backbone never attends (padding
  to its mask) and that the pruner reads as keys. At inference the prefix is built before
  denoising, so they are pure noise there (x at t = 1); training feeds them the same noise,
  not x_t, which at small t is close to the target actions (a leak inference lacks).
- ``keys`` (option B): the same features given to the pruner only (not in the prefix).
- ``prev_chunk``: the previously executed action chunk (normalised), which exists at
  inference; the policy keeps it between calls. Without one (episode start, or training
  frames sampled without it) there is no such key at all (masked, not zeros).
- ``state``: the state token (its prefix embedding, or a projection of the state for a
  suffix state token) as an extra key.

Module names mirror LeRobot's SmolVLA (``vlm_with_expert.vlm.model.{vision_model,
connector, text_model}``, ``vlm_with_expert.lm_expert``, ``state_proj``,
``action_in_proj``, ``action_out_proj``, ``action_time_mlp_in/out``).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs import ContextConfig, FlowVLAConfig
from ..context import MemoryTokensContext, make_context, map_state
from ..layers.connector import Connector
from ..layers.flow_matching import (
    action_time_embed,
    euler_sample,
    interpolate,
    sample_time,
    target_velocity,
    time_condition,
)
from ..layers.kv_cache import KVCache
from ..layers.masks import block_mask_between
from ..layers.token_pruner import TokenPruner, pruning_for_inference, stats_to_floats
from ..layers.tokens import TokenSegment
from ..layers.vision import ImageEncoder, VisionTransformer
from ..layers.vision_drop import TowerPreview
from ..layers.vision_reuse import current_frame_encoder, make_vision_reuse
from .decoder import Decoder

ACTION_KEY_CONTEXTS = ("placeholders", "keys", "prev_chunk")


class VLMInner(nn.Module):
    def __init__(self, cfg: FlowVLAConfig):
        super().__init__()
        v = cfg.vision
        self.vision_model = VisionTransformer(v.width, v.depth, v.heads, v.mlp_dim, v.image_size,
                                              v.patch_size, v.channels, v.eps, v.act,
                                              v.position_buckets)
        self.connector = Connector(v.width, cfg.text.width, cfg.connector_scale,
                                   cfg.connector_bias)
        if cfg.backbone == "mamba":
            from .mamba_prefix import MambaTextModel

            self.text_model = MambaTextModel(cfg)
        else:
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
        offset = 0 if cache.is_empty else cache.next_position()  # (B, 1)
        last_block = 0 if cache.is_empty else cache.key_block[:, -1:]
        if prefix.positions is None:
            pos = offset + torch.cumsum(prefix.pad.long(), 1) - 1  # (B, Np)
        else:
            pos = offset + prefix.positions  # (B, Np) explicit, may have gaps
        block = last_block + torch.cumsum(prefix.flags.long(), 1)  # (B, Np)
        k_block, k_pad = block, prefix.pad
        if not cache.is_empty:
            k_block = torch.cat([cache.key_block, block], 1)  # (B, L)
            k_pad = torch.cat([cache.key_pad, prefix.pad], 1)  # (B, L)
        mask = block_mask_between(prefix.query_blocks(block), prefix.pad, k_block, k_pad)
        return pos, block, mask

    def prefill(self, prefix: TokenSegment, cache: KVCache, final_norm: bool = True) -> Tensor:
        """Run the backbone over the prefix, appending to ``cache`` -> hidden (B, Np, D)
        (before the final norm with ``final_norm=False``)."""
        pos, block, mask = self.prefix_layout(prefix, cache)
        if self.cfg.backbone == "mamba":  # the recurrent state in the cache, keys projected
            return self.text_model.prefill(prefix, pos, block, cache, final_norm)
        cache.append_tokens(prefix.pad, block, pos)
        return self.text_model(prefix.embs, pos, mask, cache, final_norm)  # (B, Np, D)

    def expert(self, suffix: TokenSegment, cache: KVCache, cond: Tensor | None = None
               ) -> Tensor:
        """Run the expert over the suffix, reading (not changing) the prefix cache
        (``cond`` (B, De): the condition of π0.5's adaptive norms) -> normed hidden states
        (B, Ns, De)."""
        offset = cache.next_position()  # (B, 1) after the last real prefix token
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
                x = layer(x, cos, sin, joint_mask, past=(k, v), cond=cond)
            else:
                x = layer.forward_cross(x, cross_cos, cross_sin, cross_mask, k, v, cond)
        return exp.final_norm(x, cond)  # (B, Ns, De)


class FlowMatchingVLA(nn.Module):
    """``context`` (a :class:`memvla.configs.ContextConfig`) picks the temporal context
    (:mod:`memvla.context`): ``prefill``, ``forward`` and ``sample_actions`` take its
    current state (``context_state``; e.g. the memory tokens (B, M, D)) and return the
    next one beside their result (``None`` for a context that carries nothing).
    ``num_cameras`` sets the visual tokens per sample the pruner expects when
    ``model.pruner.num_patches`` is 0."""

    def __init__(self, cfg: FlowVLAConfig, context: ContextConfig | None = None,
                 num_cameras: int = 1):
        super().__init__()
        self.cfg = cfg
        d, de = cfg.text.width, cfg.expert.width
        self.vlm_with_expert = VLMWithExpert(cfg)
        if cfg.state_token != "prompt":  # (π0.5 writes the state into the prompt)
            self.state_proj = nn.Linear(cfg.max_state_dim,
                                        d if cfg.state_token == "prefix" else de)
        self.action_in_proj = nn.Linear(cfg.max_action_dim, de)
        self.action_out_proj = nn.Linear(de, cfg.max_action_dim)
        if cfg.time_conditioning == "adarms":  # the time's MLP conditions the expert's norms
            self.time_mlp_in = nn.Linear(de, de)
            self.time_mlp_out = nn.Linear(de, de)
        else:
            self.action_time_mlp_in = nn.Linear(2 * de, de)
            self.action_time_mlp_out = nn.Linear(de, de)
        self.context = make_context(context or ContextConfig(), d, cfg.max_action_dim)
        self.vision_reuse = make_vision_reuse(cfg.vision, self.context)  # inference only
        self.pruner: TokenPruner | None = None
        self.pruner_key_proj: nn.Linear | None = None  # action (or state) -> pruner key
        self.last_prune_stat_tensors: dict[str, Tensor] = {}  # of the last prefix built
        pc = cfg.pruner
        if pc.enabled:
            self.pruner = TokenPruner(pc, pc.num_patches or num_cameras * cfg.tokens_per_image)
            if pc.action_context in ACTION_KEY_CONTEXTS:
                self.pruner_key_proj = nn.Linear(cfg.max_action_dim, d)
            elif pc.action_context == "state" and cfg.state_token in ("suffix", "prompt"):
                self.pruner_key_proj = nn.Linear(cfg.max_state_dim, d)

    @property
    def image_encoder(self) -> ImageEncoder:
        """Images (B, C, S, S) -> prefix tokens (B, Ti, D), for the temporal context too."""
        inner = self.vlm_with_expert.vlm.model
        scale = math.sqrt(self.cfg.text.width) if self.cfg.scale_image_embeddings else 1.0
        return ImageEncoder(inner.vision_model, inner.connector, scale)

    @property
    def last_prune_stats(self) -> dict[str, float]:
        """The pruner's collapse statistics of the last prefix built, as floats."""
        return stats_to_floats(self.last_prune_stat_tensors)

    def initial_state(self, batch: int):
        """The temporal context's state at the start of ``batch`` episodes (or None)."""
        return self.context.initial_state(batch)

    def memory_norm_bound(self) -> float:
        """The largest L2 norm a written memory token can have (0 without memory tokens)."""
        if not isinstance(self.context, MemoryTokensContext):
            return 0.0
        return self.context.norm_bound(self.vlm_with_expert.text_model.norm.weight)

    def unused_parameter_names(self) -> set[str]:
        """Parameters the action loss never reaches: the prefix's hidden states after the
        last backbone layer are not read (only its keys/values are), so that layer's query,
        output and MLP weights, the final backbone norm and the LM head get no gradient.
        They are kept so that checkpoints of the reference implementations load by name.
        A temporal context that reads the prefix's outputs (memory tokens) makes them used:
        then only the LM head is unused, and the final norm too unless the context reads
        through it (memory tokens with ``context.write="norm"``)."""
        if self.context.reads_prefix_output or self.cfg.backbone == "mamba":
            # (a Mamba backbone: every block's output is read, as keys/values)
            unused = ["vlm_with_expert.vlm.lm_head."]
            if not self.context.reads_normed_output:
                unused.append("vlm_with_expert.vlm.model.text_model.norm."
                              if self.cfg.backbone == "transformer"
                              else "vlm_with_expert.vlm.model.text_model.backbone.norm_f.")
            return {n for n, _ in self.named_parameters() if n.startswith(tuple(unused))}
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
                     state: Tensor, context_state=None,
                     pruner_actions: Tensor | None = None,
                     pruner_actions_valid: Tensor | None = None) -> list[TokenSegment]:
        """The prefix as parts: images per camera + language + state (+ action
        placeholders), extended by the temporal context (e.g. memory tokens) when a
        ``context_state`` is given. With the pruner, the image parts become one pruned part
        and every part carries explicit positions. ``pruner_actions`` (B, K, Da') are the
        actions the pruner's action context reads (``pruner_actions_valid`` (B, K) bool,
        default all)."""
        vwe, d = self.vlm_with_expert, self.cfg.text.width
        if context_state is None and self.context.stateful:
            raise ValueError(f"context.kind={self.context.kind!r} needs its state: give "
                             "context_state (e.g. initial_state(B) at an episode's start)")
        encoder = self.image_encoder
        tower = self.cfg.pruner.tower_layer if self.pruner is not None else None
        previews = None if tower is None else TowerPreview(encoder, tower)
        parts = []
        for cam, img in enumerate(images):
            enc = previews or current_frame_encoder(self.vision_reuse, self.training, encoder,
                                                    cam)
            emb = self.context.encode_images(enc, img, cam, context_state)  # (B, Ti, D)
            parts.append(TokenSegment.full(emb, 0, 0))
        image_parts = list(parts)
        lang = vwe.text_model.embed(lang_ids)  # (B, Nl, D)
        if self.cfg.scale_text_embeddings:
            lang = lang * math.sqrt(d)
        lang_part = TokenSegment(lang, lang_pad, torch.zeros_like(lang_ids))
        parts.append(lang_part)
        state_emb = None
        if self.cfg.state_token == "prefix":
            state_emb = self.state_proj(state)[:, None]  # (B, 1, D)
            parts.append(TokenSegment.full(state_emb, 1, 1))
        keys = None
        if self.pruner is not None:
            keys = self._pruner_keys(state, state_emb, pruner_actions, pruner_actions_valid)
            if keys is not None and self.cfg.pruner.action_context == "placeholders":
                # in the prefix, but padding to the backbone's mask: never attended
                parts.append(TokenSegment(keys[0], torch.zeros_like(keys[1]),
                                          torch.zeros_like(keys[1], dtype=torch.long)))
        if context_state is not None:
            parts = self.context.extend_prefix(parts, context_state, encoder)
        if self.pruner is not None:
            parts = self._prune_images(parts, image_parts, lang_part, keys, previews)
        return parts

    def _pruner_keys(self, state: Tensor, state_emb: Tensor | None, actions: Tensor | None,
                     valid: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """Extra task keys of the pruner's action context: (B, K, D) and valid (B, K)."""
        ctx = self.cfg.pruner.action_context
        if ctx in ACTION_KEY_CONTEXTS and actions is not None:
            keys = self.pruner_key_proj(actions)  # (B, K, D)
        elif ctx == "state":
            keys = state_emb if state_emb is not None else self.pruner_key_proj(state)[:, None]
        else:
            return None
        if valid is None:
            valid = torch.ones(keys.shape[:2], dtype=torch.bool, device=keys.device)
        return keys, valid

    def _prune_images(self, parts: list[TokenSegment], image_parts: list[TokenSegment],
                      lang_part: TokenSegment,
                      keys: tuple[Tensor, Tensor] | None,
                      previews: TowerPreview | None = None) -> list[TokenSegment]:
        """Give every part the positions it has without pruning, then replace the image
        parts (contiguous) by the pruner's output, which keeps their original positions.
        With ``previews`` the image parts are previews the pruner votes on; the kept ones
        are finished by the rest of the vision tower (:mod:`memvla.layers.vision_drop`)."""
        pad = torch.cat([p.pad for p in parts], 1)  # (B, N)
        pos = torch.cumsum(pad.long(), 1) - 1  # (B, N) unpruned positions
        starts = [0]
        for p in parts:
            starts.append(starts[-1] + p.length)
        first = next(i for i, p in enumerate(parts) if p is image_parts[0])
        last = first + len(image_parts)
        if any(p is not q for p, q in zip(parts[first:last], image_parts, strict=True)):
            raise RuntimeError("pruner: the image parts of the prefix must be contiguous")
        patches = torch.cat([p.embs for p in image_parts], 1)  # (B, P, D)
        task, task_valid = lang_part.embs, lang_part.pad  # (B, Nl, D), (B, Nl)
        if keys is not None:
            task = torch.cat([task, keys[0]], 1)  # (B, Nl + K, D)
            task_valid = torch.cat([task_valid, keys[1]], 1)  # (B, Nl + K)
        values = None if previews is None else previews.values(self.pruner.training)
        out = self.pruner(patches, pos[:, starts[first]:starts[last]], task, task_valid,
                          values)
        self.last_prune_stat_tensors = out.stat_tensors
        # image tokens have block flag 0 (one block with what precedes them)
        images = TokenSegment(out.tokens, out.valid, torch.zeros_like(out.positions),
                              positions=out.positions)
        placed = [replace(p, positions=pos[:, starts[i]:starts[i + 1]])
                  for i, p in enumerate(parts)]
        return placed[:first] + [images] + placed[last:]

    def embed_suffix(self, state: Tensor, x_t: Tensor, t: Tensor
                     ) -> tuple[TokenSegment, Tensor | None]:
        """The expert's tokens of the noisy chunk x_t at times t (B,) (and the state token
        with ``state_token="suffix"``) -> (tokens, the condition (B, De) of the expert's
        adaptive norms with ``time_conditioning="adarms"``, else None)."""
        cfg, cond = self.cfg, None
        if cfg.time_conditioning == "adarms":
            emb = self.action_in_proj(x_t)  # (B, A, De)
            cond = time_condition(t, self.time_mlp_in, self.time_mlp_out, cfg.time_min_period,
                                  cfg.time_max_period).to(emb.dtype)  # (B, De)
        else:
            emb = action_time_embed(x_t, t, self.action_in_proj, self.action_time_mlp_in,
                                    self.action_time_mlp_out, cfg.time_min_period,
                                    cfg.time_max_period)  # (B, A, De)
        actions = TokenSegment.full(emb, 1, int(cfg.causal_actions))
        if cfg.state_token == "suffix":
            st = TokenSegment.full(self.state_proj(state)[:, None], 1, 1)  # (B, 1, De)
            return TokenSegment.cat([st, actions]), cond
        return actions, cond

    def velocity(self, cache: KVCache, state: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The predicted velocity (B, A, Da') of the noisy chunk x_t at times t (B,), the
        expert reading the filled prefix ``cache`` (one denoising step)."""
        suffix, cond = self.embed_suffix(state, x_t, t)
        h = self.vlm_with_expert.expert(suffix, cache, cond)  # (B, Ns, De)
        return self.action_out_proj(h[:, -self.cfg.chunk_size:])  # (B, A, Da)

    # -- pruner -----------------------------------------------------------------------------
    def pruner_actions(self, x: Tensor, prev_actions: Tensor | None,
                        prev_valid: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """What the pruner's action context reads: the initial noise ``x`` (B, A, Da')
        (placeholders / keys), the previous chunk (prev_chunk) or nothing."""
        ctx = self.cfg.pruner.action_context if self.pruner is not None else "none"
        if ctx in ("placeholders", "keys"):
            return x, None
        if ctx == "prev_chunk":
            return prev_actions, prev_valid
        return None, None

    # -- training -------------------------------------------------------------------------
    def prefill(self, images, lang_ids, lang_pad, state, context_state=None,
                cache: KVCache | None = None, pruner_actions: Tensor | None = None,
                pruner_actions_valid: Tensor | None = None) -> tuple[KVCache, object]:
        """Run the backbone over the prefix -> (filled cache, next context state or None).
        The prefix is appended to ``cache``, or to the context's cache of earlier turns."""
        if cache is None and context_state is not None:
            cache = self.context.prefix_cache(context_state)
        cache = cache if cache is not None else KVCache(self.cfg.text.depth)
        prefix = TokenSegment.cat(self.embed_prefix(images, lang_ids, lang_pad, state,
                                                    context_state, pruner_actions,
                                                    pruner_actions_valid))
        hidden = self.vlm_with_expert.prefill(prefix, cache,
                                              self.context.reads_normed_output)  # (B, Np, D)
        if context_state is None:
            return cache, None
        return cache, self.context.update(context_state, hidden, cache=cache, images=images)

    def write_state(self, images, lang_ids, lang_pad, state, context_state, prev=None):
        """The context's next state from a frame observed while a chunk executes (a write
        pass, ``context.observe_every``): the prefix on that frame, no actions. ``prev``:
        the executed chunk and its real steps (the pruner's ``prev_chunk``) or None."""
        pa, pv = self.pruner_actions(self._noise(state), *(prev or (None, None)))
        return self.prefill(images, lang_ids, lang_pad, state, context_state,
                            pruner_actions=pa, pruner_actions_valid=pv)[1]

    def forward(self, images: list[Tensor], lang_ids: Tensor, lang_pad: Tensor, state: Tensor,
                actions: Tensor, noise: Tensor | None = None, time: Tensor | None = None,
                context_state=None, prev_actions: Tensor | None = None,
                prev_valid: Tensor | None = None) -> tuple[Tensor, object]:
        """Flow-matching losses per element (B, A, Da): (v(x_t, t) − (noise − actions))²,
        and the next context state. Inputs are normalised and padded to max_state_dim /
        max_action_dim. ``prev_actions`` (B, A', Da') / ``prev_valid`` (B, A'): the
        previously executed chunk, read by the pruner's ``prev_chunk`` context only."""
        b = actions.shape[0]
        noise = torch.randn_like(actions) if noise is None else noise
        if time is None:
            time = sample_time(b, self.cfg.time_alpha, self.cfg.time_beta, self.cfg.time_min,
                               device=actions.device)  # (B,)
        x_t = interpolate(actions, noise, time)  # (B, A, Da)
        # the pruner's action placeholders / keys read the noise, x at t = 1: what they see
        # at inference, where the prefix is built before denoising (x_t would leak the
        # target at small t)
        pa, pv = self.pruner_actions(noise, prev_actions, prev_valid)
        cache, new_state = self.prefill(images, lang_ids, lang_pad, state, context_state,
                                        pruner_actions=pa, pruner_actions_valid=pv)
        v = self.velocity(cache, state, x_t, time)  # (B, A, Da)
        return F.mse_loss(v, target_velocity(actions, noise), reduction="none"), new_state

    # -- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def sample_actions(self, images, lang_ids, lang_pad, state, noise: Tensor | None = None,
                       num_steps: int | None = None, context_state=None,
                       prev_actions: Tensor | None = None,
                       prev_valid: Tensor | None = None) -> tuple[Tensor, object]:
        """Denoise an action chunk (B, A, Da): the prefix runs once into the cache, which
        every Euler step reuses. Returns (actions, next context state or None). The pruner's
        action placeholders / keys see the initial noise (the prefix precedes denoising);
        the pruner prunes as at inference whatever the model's mode."""
        noise = self._noise(state) if noise is None else noise
        pa, pv = self.pruner_actions(noise, prev_actions, prev_valid)
        with pruning_for_inference(self.pruner):
            cache, new_state = self.prefill(images, lang_ids, lang_pad, state, context_state,
                                            pruner_actions=pa, pruner_actions_valid=pv)
        actions = euler_sample(lambda x, t: self.velocity(cache, state, x, t), noise,
                               num_steps or self.cfg.num_steps)
        return actions, new_state

    @torch.no_grad()
    def sample_many(self, images, lang_ids, lang_pad, state, noise: Tensor,
                    context_state=None) -> Tensor:
        """K chunks of each observation from K noises (B, K, A, Da') -> (B, K, A, Da'): the
        prefix runs once per observation and every draw denoises against it (a pruner that
        reads the noise, or a recurrent backbone, runs the prefix per draw). The context's
        next state is not returned: the draws are a measurement, not a step."""
        b, k = noise.shape[:2]
        flat = noise.flatten(0, 1)  # (B·K, A, Da')
        if (self.pruner_actions(flat, None, None)[0] is not None
                or self.cfg.backbone == "mamba"):
            def rep(x):
                return None if x is None else x.repeat_interleave(k, 0)  # (B·K, ...)

            x, _ = self.sample_actions([rep(i) for i in images], rep(lang_ids), rep(lang_pad),
                                       rep(state), flat, context_state=map_state(
                                           rep, context_state))
            return x.view(b, k, *x.shape[1:])
        with pruning_for_inference(self.pruner):
            cache, _ = self.prefill(images, lang_ids, lang_pad, state, context_state)
        cache, state = cache.repeat_interleave(k), state.repeat_interleave(k, 0)
        x = euler_sample(lambda x, t: self.velocity(cache, state, x, t), flat,
                         self.cfg.num_steps)  # (B·K, A, Da')
        return x.view(b, k, *x.shape[1:])

    @torch.no_grad()
    def sample_actions_uncached(self, images, lang_ids, lang_pad, state,
                                noise: Tensor | None = None, num_steps: int | None = None,
                                context_state=None, prev_actions: Tensor | None = None,
                                prev_valid: Tensor | None = None) -> tuple[Tensor, object]:
        """Slow twin of :meth:`sample_actions`: recomputes the prefix at every step."""
        noise = self._noise(state) if noise is None else noise
        pa, pv = self.pruner_actions(noise, prev_actions, prev_valid)

        def prefill():
            with pruning_for_inference(self.pruner):
                return self.prefill(images, lang_ids, lang_pad, state, context_state,
                                    pruner_actions=pa, pruner_actions_valid=pv)

        def recomputed(x, t):
            return self.velocity(prefill()[0], state, x, t)

        actions = euler_sample(recomputed, noise, num_steps or self.cfg.num_steps)
        return actions, prefill()[1]

    def _noise(self, state: Tensor) -> Tensor:
        return torch.randn(state.shape[0], self.cfg.chunk_size, self.cfg.max_action_dim,
                           device=state.device, dtype=state.dtype)
