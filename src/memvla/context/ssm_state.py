"""A Mamba backbone's recurrent state as the temporal context (RoboMamba).

The state is the backbone's own: per layer, the causal convolution's last inputs
(B, Di, Kc − 1) and the SSM state (B, Di, Dn), as ``{"conv": [...], "ssm": [...]}`` (empty
at an episode's start: the backbone starts from zeros). Each chunk's prefix continues it,
so the whole episode is in a state of fixed size, and each step costs the same however
long the episode is. Trained through the episode like memory tokens (segments in order,
``train.bptt_depth`` truncating the gradient through the state). Needs
``model.backbone=mamba``.
"""

from __future__ import annotations

from torch import Tensor

from ..configs import ContextConfig
from ..layers.kv_cache import KVCache
from ..layers.mamba import MambaState
from .base import TemporalContext


class SSMStateContext(TemporalContext):
    kind = "ssm_state"

    def __init__(self, cfg: ContextConfig, width: int):
        super().__init__()
        self.cfg = cfg

    @property
    def recurrent(self) -> bool:
        return True

    def initial_state(self, batch: int) -> dict:
        return {"conv": [], "ssm": []}

    def prefix_cache(self, state: dict) -> KVCache | None:
        """A fresh cache holding the layers' states for the backbone to continue (None at an
        episode's start: zeros)."""
        if not state["ssm"]:
            return None
        cache = KVCache(len(state["ssm"]))
        cache.recurrent = [MambaState(c, s) for c, s in zip(state["conv"], state["ssm"],
                                                            strict=True)]
        return cache

    def update(self, state: dict, hidden: Tensor, cache: KVCache | None = None,
               images=None) -> dict:
        """The layers' states the prefix left in ``cache``."""
        if cache is None or cache.recurrent is None:
            raise ValueError("context.kind='ssm_state' needs a recurrent backbone: set "
                             "model.backbone=mamba")
        return {"conv": [s.conv for s in cache.recurrent],
                "ssm": [s.ssm for s in cache.recurrent]}
