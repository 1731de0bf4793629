"""Task registry: names -> task specs, ``make``, ``make_expert`` and the gymnasium ids."""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass
from typing import Any

import gymnasium as gym

from memvla.envs.base import TaskEnv
from memvla.envs.experts import Expert
from memvla.utils import did_you_mean

BASE_OPTIONS = ("image_size", "max_episode_steps", "memoryless", "render_mode")


@dataclass(frozen=True)
class TaskSpec:
    """One registered task: ``name`` for :func:`make`, ``gym_id`` for ``gymnasium.make``."""

    name: str
    entry_point: str  # "module:Class" of the environment
    gym_id: str
    memoryless: bool  # True for the memoryless twins (the cue stays visible)
    memory: bool  # whether the base task needs memory at all
    summary: str

    @property
    def env_class(self) -> type[TaskEnv]:
        module, cls = self.entry_point.split(":")
        return getattr(importlib.import_module(module), cls)

    def options(self) -> dict:
        """Task options and their defaults (the base options included)."""
        out = {}
        for cls in (self.env_class, TaskEnv):
            for p in inspect.signature(cls.__init__).parameters.values():
                if p.kind is p.KEYWORD_ONLY:
                    out[p.name] = p.default
        if self.memoryless:
            out["memoryless"] = True
        return out


def _specs() -> dict[str, TaskSpec]:
    base = [
        ("remember-color", "remember_color:RememberColorEnv", "RememberColor", True,
         "see a colour cue, wait through a delay, touch the object of that colour"),
        ("shell-game", "shell_game:ShellGameEnv", "ShellGame", True,
         "a ball is hidden under one of three cups that swap; touch the ball's cup"),
        ("seq-of-colors", "seq_of_colors:SeqOfColorsEnv", "SeqOfColors", True,
         "colours shown one after another; touch the objects in that order"),
        ("take-it-back", "take_it_back:TakeItBackEnv", "TakeItBack", True,
         "carry an object into a zone, then back to its (unmarked) start"),
        ("reach-color", "reach_color:ReachColorEnv", "ReachColor", False,
         "touch the object whose colour the instruction names (no memory needed)"),
        ("memory-maze", "memory_maze:MemoryMazeEnv", "MemoryMaze", True,
         "first-person maze: a guided tour past coloured markers, then back to the named one"),
        ("unseen-names", "unseen_names:UnseenNamesEnv", "UnseenNames", False,
         "touch the object a made-up word names; test words are only in stored experience"),
    ]  # fmt: skip
    specs = {}
    for name, entry, camel, memory, summary in base:
        entry = f"memvla.envs.{entry}"
        specs[name] = TaskSpec(name, entry, f"memvla/{camel}-v0", False, memory, summary)
        if memory:
            twin = f"{name}-memoryless"
            specs[twin] = TaskSpec(
                twin, entry, f"memvla/{camel}Memoryless-v0", True, memory,
                f"memoryless twin of {name}: the cue stays visible",
            )  # fmt: skip
    return specs


TASKS: dict[str, TaskSpec] = _specs()


def task_names(include_twins: bool = True) -> list[str]:
    """Registered task names (the memoryless twins ``<name>-memoryless`` included)."""
    return [n for n, s in TASKS.items() if include_twins or not s.memoryless]


def make(name: str, **options) -> TaskEnv:
    """Create the task ``name`` with ``options`` (see :mod:`memvla.envs` for each task's).

    Unknown names and options raise ValueError with a did-you-mean; out-of-range values
    raise ValueError naming the option, its range and the value received.
    """
    if name not in TASKS:
        raise ValueError(did_you_mean(name, TASKS, what="task"))
    spec = TASKS[name]
    known = spec.options()
    for key in options:
        if key not in known:
            raise ValueError(f"task {name!r}: " + did_you_mean(key, known, what="option"))
    if spec.memoryless:
        if options.get("memoryless", True) is not True:
            raise ValueError(f"task {name!r} is a memoryless twin; memoryless=False is invalid")
        options["memoryless"] = True
    return spec.env_class(**options)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """Task options from ``KEY=VALUE`` strings (``--opt`` of the command line):
    ``["delay=30", "n-colors=3", "name=abc"]`` -> ``{"delay": 30, "n_colors": 3, ...}``.
    VALUE is read as JSON (numbers, true/false, lists), else True/False/None, else a string;
    dashes in KEY become underscores."""
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"task options are KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = {"True": True, "False": False, "None": None}.get(text, text)
        options[key.strip().replace("-", "_")] = value
    return options


def make_expert(env: gym.Env) -> Expert:
    """The scripted expert for ``env`` (a memvla task, possibly wrapped)."""
    unwrapped = getattr(env, "unwrapped", env)
    if not isinstance(unwrapped, TaskEnv):
        raise ValueError(f"make_expert needs a memvla.envs task, got {type(unwrapped).__name__}")
    return unwrapped.make_expert()


def register_gym_envs() -> None:
    """Register every task with gymnasium (``gymnasium.make("memvla/RememberColor-v0")``)."""
    for spec in TASKS.values():
        if spec.gym_id not in gym.registry:
            gym.register(
                id=spec.gym_id, entry_point="memvla.envs.registry:make", kwargs={"name": spec.name}
            )
