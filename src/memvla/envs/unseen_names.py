"""``unseen-names``: touch the object the instruction names by a made-up word; what a word
means is in past experience, not in the scene.

Every episode shows the same scene: ``n_objects`` discs (2..5) of fixed colours in a row
along the top, the effector starting near the middle of the bottom edge.
The instruction names the target with a nonce word ("touch the dax"); each word stands for
one object, always the same (the i-th word of a pool names object i mod ``n_objects``:
every object is named equally often), so a policy can learn a word's
meaning from episodes that used it, and only from them. The words come in two disjoint
pools: ``names="train"`` (``n_train_names`` words, what a training set is recorded with)
and ``names="test"`` (``n_test_names`` others, never in training): with a test word a
policy without experience of it is at chance, 1 / ``n_objects``; given a few stored
episodes with that word (:mod:`memvla.retrieval`) it can do what they did.

``reset(options={"name": word})`` forces the word (it must be in the pool);
``reset(options={"decoy": j})`` (j in 1 .. n_objects - 1) makes the scripted expert go to
the object j places after the target: a failed episode, for stores that hold failures.
"""

from __future__ import annotations

import numpy as np

from memvla.envs.base import TouchTargetTask, check_choice, check_int
from memvla.envs.experts import Expert, goto_avoiding

NAME_POOLS = ("train", "test")
INSTRUCTION = "touch the {name}"  # one template: the word is all that differs
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "bl",
           "dr", "gl", "kr", "sn", "tw")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "x", "k", "p", "t", "m", "n", "sh")


def nonce_words(pool: str, count: int) -> list[str]:
    """``count`` made-up words of ``pool`` (deterministic, and the first words of a pool
    are the same whatever ``count``; the two pools are disjoint: train words have two
    syllables, test words three)."""
    rng = np.random.default_rng(0 if pool == "train" else 1)
    syllables = 2 if pool == "train" else 3
    words: list[str] = []
    while len(words) < count:
        parts = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                 for _ in range(syllables)]
        word = "".join(parts) + _CODAS[rng.integers(len(_CODAS))]
        if word not in words:
            words.append(word)
    return words


class UnseenNamesEnv(TouchTargetTask):
    """Fixed scene, nonce-word instructions (see the module docstring)."""

    option_keys = ("name", "decoy")

    def __init__(self, *, n_objects: int = 3, names: str = "train", n_train_names: int = 200,
                 n_test_names: int = 20, **kwargs):
        self.n_objects = check_int("n_objects", n_objects, 2, 5, "discs in one row")
        self.names = check_choice("names", names, NAME_POOLS)
        count = check_int("n_train_names" if names == "train" else "n_test_names",
                          n_train_names if names == "train" else n_test_names, 1, 5000)
        super().__init__(**kwargs)
        self.words = nonce_words(self.names, count)
        self.positions = np.stack([np.linspace(0.2, 0.8, self.n_objects),
                                   np.full(self.n_objects, 0.15)], 1)  # (n, 2): the top row
        self.color_ids = np.arange(self.n_objects)  # (n,) palette indices, fixed
        self.word = self.words[0]
        self.target = self.goal = 0

    def _start_position(self, rng: np.random.Generator) -> np.ndarray:
        """Near the middle of the bottom edge, far from every object (an episode takes
        several chunks, and where the effector has gone shows which object it heads for)."""
        return np.array([rng.uniform(0.45, 0.55), rng.uniform(0.88, 0.94)])  # (2,)

    def _reset_task(self, rng, options) -> None:
        self.word = self.words[int(rng.integers(len(self.words)))]
        if "name" in options:
            if options["name"] not in self.words:
                raise ValueError(f"option 'name' must be a word of the {self.names!r} pool "
                                 f"(e.g. {self.words[:3]}), got {options['name']!r}")
            self.word = options["name"]
        self.target = self.words.index(self.word) % self.n_objects
        decoy = check_int("decoy", options.get("decoy", 0), 0, self.n_objects - 1)
        self.goal = (self.target + decoy) % self.n_objects  # where the expert goes

    def _instruction(self, rng) -> str:
        return INSTRUCTION.format(name=self.word)

    def make_expert(self) -> Expert:
        return UnseenNamesExpert(self)


class UnseenNamesExpert(Expert):
    """Goes straight to the named object (to the decoy's, when one was asked for)."""

    def act(self, obs=None) -> np.ndarray:
        env = self.env
        others = np.delete(env.positions, env.goal, axis=0)  # (n-1, 2)
        return goto_avoiding(env.eff, env.positions[env.goal], others, np.array([0.5, 0.5]))
