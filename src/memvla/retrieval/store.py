"""The experience store: what was done where, across episodes, found by nearest neighbour.

An item is one predicted chunk of an episode: the embedding of its observation and
instruction (:mod:`memvla.retrieval.embedder`), the action chunk that followed (A, Da),
whether the episode succeeded, and its episode id. Items come from datasets
(:func:`memvla.retrieval.record.store_from_dataset`) and from the robot's own rollouts
(``memvla eval --record-to STORE``).

Search is by inner product of the (unit) embeddings, i.e. cosine similarity, through faiss
when it is installed: ``index="exact"`` (a flat index: the exact top-k) or ``"hnsw"`` (a
graph index: approximate, for stores of millions); without faiss, an exact search in
torch. A store is a directory written atomically (``experience.safetensors`` +
``experience.json``; no pickle): an interrupted write leaves the previous one readable.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from ..utils import atomic_directory, json_bytes, read_json, write_file

FORMAT, VERSION = "memvla-experience", 1
TENSORS, META = "experience.safetensors", "experience.json"
INDEXES = ("exact", "hnsw")


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class ExperienceStore:
    """Items (embedding (E,), actions (A, Da), success, episode) and their index."""

    def __init__(self, embedder: dict, chunk: int, action_dim: int, index: str = "exact"):
        if index not in INDEXES:
            raise ValueError(f"experience store: index must be one of {INDEXES}, got {index!r}")
        self.embedder, self.chunk, self.action_dim, self.index_kind = (
            dict(embedder), chunk, action_dim, index)
        dim = self.dim
        self.embeddings = torch.zeros(0, dim)
        self.actions = torch.zeros(0, chunk, action_dim)
        self.success = torch.zeros(0, dtype=torch.bool)
        self.episode = torch.zeros(0, dtype=torch.long)
        self._index = None
        self._indexed = 0  # rows of the embeddings the index holds

    @property
    def dim(self) -> int:
        return int(self.embedder["dim"])

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def next_episode(self) -> int:
        """The first episode id past those the store holds (0 when empty)."""
        return int(self.episode.max()) + 1 if len(self) else 0

    def add(self, embeddings: Tensor, actions: Tensor, success: Tensor, episode: Tensor
            ) -> None:
        """Append N items: embeddings (N, E), actions (N, A, Da), success (N,), episode (N,)."""
        n = embeddings.shape[0]
        want = {"embeddings": (n, self.dim), "actions": (n, self.chunk, self.action_dim),
                "success": (n,), "episode": (n,)}
        for name, value in zip(want, (embeddings, actions, success, episode), strict=True):
            if tuple(value.shape) != want[name]:
                raise ValueError(f"experience store: {name} must be {want[name]}, got "
                                 f"{tuple(value.shape)}")
        self.embeddings = torch.cat([self.embeddings, embeddings.float().cpu()])
        self.actions = torch.cat([self.actions, actions.float().cpu()])
        self.success = torch.cat([self.success, success.bool().cpu()])
        self.episode = torch.cat([self.episode, episode.long().cpu()])

    def extend(self, other: ExperienceStore) -> None:
        """Append ``other``'s items (their first ``chunk`` actions; episode ids moved past
        this store's own)."""
        if other.embedder != self.embedder or other.action_dim != self.action_dim or (
                other.chunk < self.chunk):
            raise ValueError(f"experience store: cannot add items of {other.chunk} × "
                             f"{other.action_dim} actions ({other.embedder.get('name')}, "
                             f"dim {other.dim}) to a store of {self.chunk} × "
                             f"{self.action_dim} ({self.embedder.get('name')}, dim {self.dim})")
        if not len(other):
            return
        self.add(other.embeddings, other.actions[:, : self.chunk], other.success,
                 other.episode - int(other.episode.min()) + self.next_episode)

    def _search_index(self):
        """The faiss index over every item (built, or brought up to date, lazily)."""
        faiss = _faiss()
        if faiss is None:
            return None
        if self._index is None:
            if self.index_kind == "exact":
                self._index = faiss.IndexFlatIP(self.dim)
            else:  # 32 links per node, a search beam of 64
                self._index = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
                self._index.hnsw.efSearch = 64
            self._indexed = 0
        if self._indexed < len(self):
            self._index.add(self.embeddings[self._indexed:].numpy())
            self._indexed = len(self)
        return self._index

    def search(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` items nearest to each query (Q, E) -> (indices (Q, k), scores (Q, k)),
        best first."""
        if query.dim() != 2 or query.shape[1] != self.dim:
            raise ValueError(f"experience store: queries must be (Q, {self.dim}) (the "
                             f"embedder's width), got {tuple(query.shape)}")
        if not 1 <= k <= len(self):
            raise ValueError(f"experience store: k must be in [1, {len(self)}] (the items "
                             f"held), got {k}")
        q = query.detach().float().cpu().contiguous()
        index = self._search_index()
        if index is None:
            scores, idx = (q @ self.embeddings.T).topk(k, dim=1)  # (Q, k)
            return idx, scores
        scores, idx = index.search(q.numpy(), k)
        return torch.from_numpy(idx).long(), torch.from_numpy(scores)

    def items(self, idx: Tensor) -> dict[str, Tensor]:
        """The items at ``idx`` (any shape ...) -> their fields (..., ...)."""
        return {"embeddings": self.embeddings[idx], "actions": self.actions[idx],
                "success": self.success[idx], "episode": self.episode[idx]}

    # -- files -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write (or replace, as a whole and atomically) the store directory ``path``."""
        meta = {"format": FORMAT, "version": VERSION, "embedder": self.embedder,
                "chunk": self.chunk, "action_dim": self.action_dim, "size": len(self),
                "index": self.index_kind}
        tensors = {"embeddings": self.embeddings.contiguous(), "actions": self.actions,
                   "success": self.success.to(torch.uint8), "episode": self.episode}
        with atomic_directory(path) as tmp:
            write_file(tmp / TENSORS, st_save(tensors))
            write_file(tmp / META, json_bytes(meta))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, embedder: dict | None = None) -> ExperienceStore:
        """The store at ``path``; with ``embedder`` (a spec), one built by another embedder
        is refused, naming what differs."""
        path = Path(path)
        meta_path, tensor_path = path / META, path / TENSORS
        for p in (meta_path, tensor_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing; is {path} an experience store?")
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r} version "
                             f"{meta.get('version')!r}; expected {FORMAT!r} version {VERSION}")
        if embedder is not None and meta["embedder"] != embedder:
            diff = sorted(k for k in {*embedder, *meta["embedder"]}
                          if embedder.get(k) != meta["embedder"].get(k))
            raise ValueError(f"{path}: built with another embedder: " + "; ".join(
                f"{k} is {meta['embedder'].get(k)!r} there, {embedder.get(k)!r} here"
                for k in diff))
        try:
            t = st_load(tensor_path.read_bytes())
        except Exception as e:
            raise ValueError(f"{tensor_path}: corrupt safetensors file ({e})") from e
        store = cls(meta["embedder"], meta["chunk"], meta["action_dim"],
                    meta.get("index", "exact"))
        missing = [k for k in ("embeddings", "actions", "success", "episode") if k not in t]
        if missing:
            raise ValueError(f"{tensor_path}: lacks {missing}")
        store.add(t["embeddings"], t["actions"], t["success"], t["episode"])
        if len(store) != meta["size"]:
            raise ValueError(f"{tensor_path}: {len(store)} items, {meta_path} says "
                             f"{meta['size']}")
        return store
