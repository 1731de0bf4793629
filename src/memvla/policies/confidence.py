"""How sure a policy is of a chunk: the measures a switch between a fast path and a
memory path (retrieval) reads.

- :func:`sample_spread` (the flow-matching family): the spread of K chunks sampled from
  different noise for the same observation, in normalised action units: the mean over
  steps and dimensions of the standard deviation across the K samples. A policy that knows
  what to do maps every noise to nearly the same chunk.
- :func:`vote_entropy` (a token pruner's): the entropy of the votes the patches cast for
  each other (LightVLA's selection), normalised to [0, 1]: 0 when every patch votes for
  the same one, 1 when the votes are spread evenly.

Lower is surer for both; :func:`confidence_of` turns either into a confidence in [0, 1]
(1 − normalised measure, the spread clipped at ``max_spread``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def sample_chunks(policy, obs: dict, samples: int, generator: torch.Generator | None = None,
                  first: Tensor | None = None, inputs: tuple | None = None) -> Tensor:
    """``samples`` chunks of a flow-matching ``policy`` for ``obs`` (B, K, A, Da'),
    normalised, from one prefix per observation; ``first`` (B, A, Da'): the noise of the
    first draw (else drawn like the others); ``inputs``: ``obs`` as
    ``policy.encode_observation`` gives it, when the caller has it already. The policy's
    carried state is read, not changed."""
    if policy.config.family != "flow":
        raise ValueError(f"sample_spread samples a flow-matching policy's noise; a "
                         f"{policy.config.family!r} policy regresses one chunk")
    if samples < 2:
        raise ValueError(f"sample_spread needs samples >= 2, got {samples}")
    images, ids, pad, state = inputs or policy.encode_observation(obs)
    b, m = ids.shape[0], policy.config.model
    context = policy.context_state
    if context is None and policy.model.context.stateful:
        context = policy.model.initial_state(b)
    noise = torch.randn(b, samples, m.chunk_size, m.max_action_dim, generator=generator,
                        device=policy.device).to(policy.dtype)  # (B, K, A, Da')
    if first is not None:
        noise[:, 0] = first.to(noise)
    return policy.model.sample_many(images, ids, pad, state, noise, context_state=context)


def sample_spread(policy, obs: dict, samples: int = 8, generator: torch.Generator | None = None
                  ) -> Tensor:
    """The spread of ``samples`` chunks of a flow-matching ``policy`` for ``obs`` (B,);
    the policy's carried state is read, not changed."""
    x = sample_chunks(policy, obs, samples, generator)[..., : policy.config.action_dim]
    return spread_of(x)


def spread_of(chunks: Tensor) -> Tensor:
    """K chunks per observation (B, K, A, Da) -> their spread (B,)."""
    return chunks.float().std(1).mean((1, 2))


def vote_entropy(votes: Tensor) -> Tensor:
    """Votes per patch (B, P) -> the normalised entropy of their distribution (B,)."""
    p = votes.float() / votes.float().sum(1, keepdim=True).clamp_min(1e-9)  # (B, P)
    h = -(p * p.clamp_min(1e-12).log()).sum(1)  # (B,)
    return h / math.log(votes.shape[1])


def confidence_of(measure: Tensor, kind: str, max_spread: float = 1.0) -> Tensor:
    """A confidence in [0, 1] from ``sample_spread`` (``kind="spread"``) or
    ``vote_entropy`` (``"entropy"``)."""
    if kind == "spread":
        return 1 - (measure / max_spread).clamp(0, 1)
    if kind == "entropy":
        return 1 - measure.clamp(0, 1)
    raise ValueError(f"confidence kind must be 'spread' or 'entropy', got {kind!r}")
