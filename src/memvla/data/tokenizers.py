"""Tokenizers: a dependency-free word/byte tokenizer for the built-in tasks, and an adapter
for a Hugging Face tokenizer loaded from a local directory (no hub access).

Both map a list of B strings to ``ids`` (B, N) long and ``pad`` (B, N) bool (True for
real tokens), right-padded to ``max_length``. A text longer than ``max_length`` tokens is
an error, never truncated.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ..configs import TokenizerConfig

# Words of the built-in task instructions and common manipulation vocabulary; anything
# else is spelled as UTF-8 bytes.
_WORDS_TEXT = """
a an the this that these those it its one two three four five six seven eight nine ten
first second third fourth fifth last next then after before again later now once
and or of to in on at by with from into onto under over above below near left right
up down back front behind between same other each every all
red green blue yellow orange purple pink cyan white black gray grey brown magenta
color colour colors colours ball balls cup cups object objects block blocks cube cubes
disc dot dots circle square zone area target start place position spot marker item items
touch reach go move push pull pick put grasp grab release drop lift return bring
take remember recall memorize watch find choose select follow hit press open close
shown showed seen saw appeared appears order sequence hidden hides shuffled shuffle swap
where which what was is are were be been had has have you your
see wait matching marked carry hiding started them
"""
DEFAULT_WORDS: tuple[str, ...] = tuple(_WORDS_TEXT.split())

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_SPLIT = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    """Lower-cases, splits into words and punctuation, maps known words to one id each
    and spells unknown words as bytes. Ids: 0..3 specials, 4..259 bytes, then words."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, words: list[str] | tuple[str, ...] = DEFAULT_WORDS, max_length: int = 48):
        words = list(dict.fromkeys(w.lower() for w in words))
        self.words = words
        self.max_length = max_length
        self._word_id = {w: len(SPECIALS) + 256 + i for i, w in enumerate(words)}

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + 256 + len(self.words)

    def encode(self, text: str) -> list[int]:
        ids = [self.bos_id]
        for piece in _SPLIT.findall(text.lower()):
            if piece in self._word_id:
                ids.append(self._word_id[piece])
            else:
                ids.extend(len(SPECIALS) + b for b in piece.encode("utf-8"))
        return ids

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        pending = bytearray()
        id_word = {v: k for k, v in self._word_id.items()}
        for i in ids:
            if len(SPECIALS) <= i < len(SPECIALS) + 256:
                pending.append(i - len(SPECIALS))
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            if i in id_word:
                out.append(id_word[i])
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return " ".join(out)

    def __call__(self, texts: list[str], key: str = "task") -> tuple[Tensor, Tensor]:
        return _pad_batch([self.encode(t) for t in texts], self.max_length, self.pad_id, key)


# the files a Hugging Face tokenizer may be read from
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                      "chat_template.jinja", "chat_template.json")


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory (``transformers`` is needed)."""

    def __init__(self, path: str, max_length: int = 48, append_newline: bool = False,
                 prompt: str = "{task}", end_ids: list[int] | None = None):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("tokenizer.kind = 'hf' needs transformers: "
                              "pip install 'memvla[hf]'") from e
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise ValueError(f"tokenizer.path {path!r}: could not load a Hugging Face tokenizer "
                             f"from this local directory ({type(e).__name__}: {e})") from e
        self.path = Path(path)
        self.max_length = max_length
        self.append_newline = append_newline
        self.prompt, self.end_ids = prompt, list(end_ids or [])
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.bos_id = self.tok.bos_token_id  # None for tokenizers without one

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        text = self.prompt.format(task=text, task_lower=text.lower())
        if self.append_newline and not text.endswith("\n"):
            text += "\n"
        ids = list(self.tok(text, add_special_tokens=True)["input_ids"])
        n = len(self.end_ids)
        return ids + self.end_ids if n and ids[-n:] != self.end_ids else ids

    def files(self) -> dict[str, bytes]:
        """The tokenizer's files by name, as found in its directory (copied verbatim, so
        that any transformers version reads them as it read the source), to travel with a
        checkpoint."""
        return {name: (self.path / name).read_bytes() for name in HF_TOKENIZER_FILES
                if (self.path / name).is_file()}

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def __call__(self, texts: list[str], key: str = "task") -> tuple[Tensor, Tensor]:
        return _pad_batch([self.encode(t) for t in texts], self.max_length, self.pad_id, key)


def _pad_batch(seqs: list[list[int]], max_length: int, pad_id: int,
               key: str) -> tuple[Tensor, Tensor]:
    ids = torch.full((len(seqs), max_length), pad_id, dtype=torch.long)  # (B, N)
    pad = torch.zeros(len(seqs), max_length, dtype=torch.bool)  # (B, N)
    for i, s in enumerate(seqs):
        if len(s) > max_length:
            raise ValueError(f"{key}[{i}]: {len(s)} tokens, more than the tokenizer limit "
                             f"max_length={max_length}; shorten the text or raise "
                             "tokenizer.max_length")
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        pad[i, : len(s)] = True
    return ids, pad


def make_tokenizer(cfg: TokenizerConfig) -> WordTokenizer | HFTokenizer:
    if cfg.kind == "hf":
        return HFTokenizer(cfg.path, cfg.max_length, cfg.append_newline, cfg.prompt,
                           cfg.end_ids)
    return WordTokenizer(cfg.words if cfg.words is not None else DEFAULT_WORDS, cfg.max_length)
