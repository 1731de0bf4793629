"""Small helpers shared across the package: did-you-mean errors, atomic file writes and
atomic directory replacement.

A directory ``d`` is replaced as a whole (:func:`atomic_directory`): the new version is
written into the sibling ``.d.new``, its files and the directory itself are fsynced, then
``d`` is renamed to ``.d.old``, ``.d.new`` to ``d`` (both renames are atomic and the parent
directory is fsynced after each), and ``.d.old`` is removed. A process killed at any moment
leaves ``d`` complete (old or new) or, between the two renames, no ``d`` but a complete
``.d.old``: :func:`readable_directory` then answers ``.d.old`` (the old version), and the
next replacement of ``d`` first puts it back (:func:`recover_directory`). A ``.d.new`` is
never read: it is complete only once it has been renamed to ``d``.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def did_you_mean(name: str, choices: Iterable[str], what: str = "name") -> str:
    """Message for an unknown ``name``: lists the known choices and the closest ones."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {what} {name!r}.{hint} Known: {', '.join(choices)}."


# -- files ----------------------------------------------------------------------------------
def fsync_directory(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` (created, renamed, removed files) durable."""
    if os.name == "nt":  # directories cannot be opened there; NTFS journals the entries
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (for files of a directory not yet published;
    elsewhere use :func:`atomic_write_bytes`)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new file, and
    the new one survives a crash once this returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; a missing or unreadable file is an error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


# -- directories ----------------------------------------------------------------------------
def staging_directory(path: Path) -> Path:
    """Where the next version of directory ``path`` is written before it replaces it."""
    return path.with_name(f".{path.name}.new")


def _previous(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _trash(path: Path) -> Path:
    return path.with_name(f".{path.name}.trash")


def readable_directory(path: str | os.PathLike) -> Path:
    """``path``, or its previous version while a replacement was cut between its renames."""
    path = Path(path)
    if path.exists():
        return path
    old = _previous(path.resolve())
    return old if old.is_dir() else path


def recover_directory(path: Path) -> None:
    """Finish what a killed replacement of ``path`` left: put the previous version back
    if ``path`` is missing, and remove the leftovers."""
    old, new = _previous(path), staging_directory(path)
    if not path.exists() and old.is_dir():
        os.rename(old, path)
        fsync_directory(path.parent)
    for leftover in (old, new, _trash(path)):
        if leftover.exists():
            shutil.rmtree(leftover)


def begin_directory(path: str | os.PathLike) -> Path:
    """An empty staging directory for the next version of ``path`` (see
    :func:`commit_directory`)."""
    path = Path(path).resolve()  # through a link: the directory it names is replaced
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    staging = staging_directory(path)
    staging.mkdir()
    return staging


def commit_directory(path: str | os.PathLike) -> Path:
    """Replace ``path`` by its staging directory, whose files are already fsynced (see
    :func:`write_file`)."""
    path = Path(path).resolve()
    staging, old = staging_directory(path), _previous(path)
    fsync_directory(staging)
    if path.exists():
        os.rename(path, old)
        fsync_directory(path.parent)
    os.rename(staging, path)
    fsync_directory(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_directory(d) as tmp:`` write the files of ``d`` into ``tmp`` (with
    :func:`write_file`); on leaving, ``tmp`` replaces ``d`` as a whole."""
    staging = begin_directory(path)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit_directory(path)


def remove_directory(path: str | os.PathLike) -> None:
    """Remove directory ``path`` at once for readers: renamed away, then deleted."""
    path = Path(path).resolve()
    trash = _trash(path)
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    fsync_directory(path.parent)
    shutil.rmtree(trash)
