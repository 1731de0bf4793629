"""Actions as text tokens (StreamVLN's "↑ ← → STOP"), read by the language-model head.

A task with ``n`` discrete actions stores each step's action as a one-hot vector (Da = n)
(e.g. memory-maze: forward, turn left, turn right, stop). Here action ``i`` is the token
``first_id + i`` of the decoder's vocabulary (the last ``n`` ids, as OpenVLA reserves the
last ids of Llama's vocabulary for its action bins): a turn predicts ``K`` of them, one per
future step, each from the hidden state of the slot before it (teacher forcing in training,
greedy decoding at inference, over the ``n`` action tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SYMBOLS = {4: ("↑", "←", "→", "STOP")}  # how the actions read as text, where known


def actions_to_tokens(actions: Tensor, first_id: int) -> Tensor:
    """One-hot (or scored) actions (B, K, n) -> token ids (B, K): the largest entry's."""
    return actions.argmax(-1) + first_id  # (B, K)


def tokens_to_actions(ids: Tensor, first_id: int, n: int, dtype=torch.float32) -> Tensor:
    """Token ids (B, K) of the ``n`` action tokens -> one-hot actions (B, K, n)."""
    index = ids - first_id  # (B, K)
    if bool(((index < 0) | (index >= n)).any()):
        raise ValueError(f"action tokens must be ids {first_id}..{first_id + n - 1}, got "
                         f"{sorted(set(ids.flatten().tolist()))}")
    return F.one_hot(index, n).to(dtype)  # (B, K, n)


def slot_inputs(targets: Tensor, start_id: int) -> Tensor:
    """The slots' input ids (B, K) for targets (B, K): the start token, then each target but
    the last (the slot of step k reads step k - 1's action)."""
    start = torch.full_like(targets[:, :1], start_id)  # (B, 1)
    return torch.cat([start, targets[:, :-1]], 1)  # (B, K)


def action_logits(logits: Tensor, first_id: int, n: int) -> Tensor:
    """The LM head's logits (B, K, V) restricted to the action tokens (B, K, n)."""
    return logits[..., first_id:first_id + n]


def token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of every slot over the whole vocabulary: logits (B, K, V), target ids
    (B, K) -> (B, K)."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def greedy_decode(logits_of, k: int, start_id: int, first_id: int, n: int,
                  batch: int, device) -> tuple[Tensor, Tensor]:
    """Greedy decoding of ``k`` action tokens: ``logits_of(slot ids (B, K)) -> (B, K, V)``
    is called once per step with the tokens decoded so far (the rest are placeholders that
    the causal slots cannot see) -> (ids (B, K), the last call's logits (B, K, V))."""
    ids = torch.full((batch, k), first_id, dtype=torch.long, device=device)  # (B, K)
    logits = None
    for step in range(k):
        logits = logits_of(slot_inputs(ids, start_id))  # (B, K, V)
        best = action_logits(logits[:, step], first_id, n).argmax(-1)  # (B,)
        ids[:, step] = best + first_id
    return ids, logits
