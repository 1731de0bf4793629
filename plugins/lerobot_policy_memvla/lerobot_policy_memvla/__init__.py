"""memvla's policies inside LeRobot: ``lerobot-train --policy.type=memvla ...``.

LeRobot imports every installed distribution whose name starts with ``lerobot_policy_``
(``register_third_party_plugins``); importing this package registers the ``memvla`` policy
config, and LeRobot finds the policy class and the processors by its naming convention
(``configuration_memvla.MemvlaConfig`` -> ``modeling_memvla.MemvlaPolicy`` and
``processor_memvla.make_memvla_pre_post_processors``).
"""

from .configuration_memvla import MemvlaConfig

__all__ = ["MemvlaConfig"]
