"""Filling an experience store: from a LeRobot v3.0 dataset, and from rollouts.

An item every ``stride`` frames of an episode (default: the chunk, as a policy predicts):
the embedding of that frame's images and task, the ``chunk`` actions from it (the last
action repeated past the episode's end), the episode's outcome and its id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .embedder import ObservationEmbedder
from .store import ExperienceStore


def chunk_actions(actions: np.ndarray, starts: np.ndarray, chunk: int) -> np.ndarray:
    """(T, Da) actions of an episode -> (len(starts), chunk, Da) from each start, the last
    action repeated past the end."""
    idx = np.minimum(starts[:, None] + np.arange(chunk)[None], len(actions) - 1)  # (N, A)
    return actions[idx]


def store_from_dataset(root: str | Path, chunk: int, stride: int | None = None,
                       success: bool = True, store: ExperienceStore | None = None,
                       embedder: ObservationEmbedder | None = None, progress: bool = True
                       ) -> ExperienceStore:
    """The items of every episode of dataset ``root`` (all ``success``, as a dataset of
    kept expert episodes is), added to ``store`` (default: a new one, whose episode ids are
    the dataset's ``episode_index``; added to a store that holds items, new ids after
    its own)."""
    from ..data.lerobot_v3 import LeRobotV3Dataset

    ds = LeRobotV3Dataset(root, images_as="uint8")
    cams = ds.image_keys
    embedder = embedder or (ObservationEmbedder.from_spec(store.embedder) if store is not None
                            else ObservationEmbedder(cameras=len(cams)))
    action_dim = ds.features["action"]["shape"][0]
    store = store or ExperienceStore(embedder.spec(), chunk, action_dim)
    ids = (np.arange(ds.num_episodes) + store.next_episode if len(store)
           else np.asarray(ds.episode_index))  # (E,)
    for e in tqdm(range(ds.num_episodes), desc="store", disable=not progress):
        lo, hi = ds.episode_range(e)
        starts = np.arange(0, hi - lo, stride or chunk)
        frames = lo + starts
        images = [torch.from_numpy(ds.get_numpy(k, frames)) for k in cams]  # (N, H, W, C)
        tasks = [ds.task_at(int(f)) for f in frames]
        actions = chunk_actions(ds.get_numpy("action", np.arange(lo, hi)), starts, chunk)
        n = len(frames)
        store.add(embedder(images, tasks), torch.from_numpy(actions),
                  torch.full((n,), success), torch.full((n,), int(ids[e])))
    return store


def open_store(path: str | Path, embedder: ObservationEmbedder, chunk: int,
               action_dim: int) -> ExperienceStore:
    """The store at ``path`` (checked against ``embedder`` and the chunk shape), or a new
    empty one when there is none yet."""
    if not (Path(path) / "experience.json").is_file():
        return ExperienceStore(embedder.spec(), chunk, action_dim)
    store = ExperienceStore.load(path, embedder=embedder.spec())
    if (store.chunk, store.action_dim) != (chunk, action_dim):
        raise ValueError(f"{path}: items of {store.chunk} × {store.action_dim} actions; this "
                         f"policy's chunks are {chunk} × {action_dim}")
    return store


def rollout_recorder(path: str | Path, policy) -> RolloutRecorder:
    """A recorder of ``policy``'s rollouts into the store at ``path`` (opened or new)."""
    cfg = policy.config
    embedder = ObservationEmbedder(cameras=len(cfg.image_keys))
    store = open_store(path, embedder, cfg.n_action_steps, cfg.action_dim)
    return RolloutRecorder(store, embedder, cfg.image_keys)


class RolloutRecorder:
    """Items of rollouts as they run: :meth:`chunks` at every predicted chunk (the
    observations, the chunks' actions), :meth:`end` with each episode's outcome; kept
    until the episode ends (its outcome is known then)."""

    def __init__(self, store: ExperienceStore, embedder: ObservationEmbedder,
                 image_keys: list[str]):
        self.store, self.embedder, self.image_keys = store, embedder, image_keys
        self.pending: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self.next_id = store.next_episode

    def chunks(self, episodes: list, observations: list[dict], actions: np.ndarray) -> None:
        """One chunk of each of ``episodes``: ``observations`` one environment observation
        each, ``actions`` (N, A, Da) the chunks the policy predicted for them."""
        images = [torch.from_numpy(np.stack([np.asarray(o[k]) for o in observations]))
                  for k in self.image_keys]  # per camera (N, H, W, C)
        emb = self.embedder(images, [o["task"] for o in observations])  # (N, E)
        for episode, e, a in zip(episodes, emb, torch.as_tensor(actions), strict=True):
            self.pending.setdefault(episode, []).append((e, a))

    def end(self, episode: int, success: bool) -> None:
        items = self.pending.pop(episode, [])
        if not items:
            return
        emb = torch.stack([e for e, _ in items])  # (N, E)
        act = torch.stack([a for _, a in items])  # (N, A, Da)
        n = len(items)
        self.store.add(emb, act[:, : self.store.chunk, : self.store.action_dim],
                       torch.full((n,), bool(success)), torch.full((n,), self.next_id))
        self.next_id += 1


def store_from_expert(task: str, resets: list[dict], chunk: int, stride: int,
                      options: dict | None = None, store: ExperienceStore | None = None,
                      embedder: ObservationEmbedder | None = None, seed: int = 0,
                      progress: bool = True) -> ExperienceStore:
    """The scripted expert's episodes of ``task`` (one per entry of ``resets``, the reset
    options of each, e.g. ``{"name": w}`` or ``{"decoy": 1}``; seeds ``seed``,
    ``seed + 1``, ...) as store items every ``stride`` frames, each with its episode's
    outcome (a decoy's failure included)."""
    from ..data.record import record_episode
    from ..envs import make, make_expert

    env = make(task, **(options or {}))
    keys = [k for k in env.observation_space.spaces if k.startswith("observation.images.")]
    embedder = embedder or (ObservationEmbedder.from_spec(store.embedder) if store is not None
                            else ObservationEmbedder(cameras=len(keys)))
    store = store or ExperienceStore(embedder.spec(), chunk, env.action_space.shape[0])
    recorder = RolloutRecorder(store, embedder, keys)
    for i, reset in enumerate(tqdm(resets, desc="store", disable=not progress)):
        frames, instruction, success = record_episode(env, make_expert(env), seed + i,
                                                      options=reset)
        starts = np.arange(0, len(frames["action"]), stride)
        chunks = chunk_actions(frames["action"], starts, chunk)  # (N, A, Da)
        seen = [{**{k: frames[k][s] for k in keys}, "task": instruction} for s in starts]
        recorder.chunks([i] * len(starts), seen, chunks)
        recorder.end(i, bool(success))
    return store


def word_resets(task: str, per_word: int, options: dict | None = None, decoy: int = 0
                ) -> list[dict]:
    """Reset options of ``per_word`` episodes with each word of a task's word pool
    (``unseen-names``), the expert sent to the decoy ``decoy`` places away (0: none)."""
    from ..envs import make

    env = make(task, **(options or {}))
    words = getattr(env.unwrapped, "words", None)
    if words is None:
        raise ValueError(f"task {task!r} has no word pool; --each-word is for unseen-names")
    extra = {"decoy": decoy} if decoy else {}
    return [{"name": w, **extra} for w in words for _ in range(per_word)]


def expert_resets(task: str, episodes: int = 0, each_word: int = 0,
                  options: dict | None = None, decoy: int = 0) -> list[dict]:
    """Reset options of the expert episodes to record: ``each_word`` per word of the task's
    pool (:func:`word_resets`) or else ``episodes`` of them, the expert sent to the decoy
    ``decoy`` places away (0: none)."""
    if each_word:
        return word_resets(task, each_word, options, decoy)
    if episodes <= 0:
        raise ValueError("give --episodes N or --each-word N (the expert episodes to add)")
    return [{"decoy": decoy} if decoy else {} for _ in range(episodes)]


def next_seed(store: ExperienceStore | None, seed: int = 0) -> int:
    """The first seed of episodes added to ``store``: ``seed`` past the episode ids it
    already holds, so adding to a store never records an episode it has again."""
    return seed + (store.next_episode if store is not None else 0)
