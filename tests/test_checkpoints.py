"""Checkpoints are replaced as a whole: a process killed at any moment of a save leaves the
old checkpoint or the new one, never a mix; loading never unpickles."""

import os
import random
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from memvla.policies import load_policy, make_policy, resolve_checkpoint
from memvla.presets import get_preset
from memvla.training.state import last_checkpoint, save_checkpoint

# the file-system calls a save is made of; the child process is killed before one of them
EVENTS = ("mkdir", "rename", "replace", "fsync", "unlink", "rmdir")


def killed_before_event(n: int, work) -> bool:
    """Run ``work()`` in a forked child that SIGKILLs itself just before its n-th
    file-system call (see EVENTS). True if it was killed, False if ``work`` finished."""
    python_rng = random.getstate()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test run
        code = 1
        try:
            random.setstate(python_rng)  # `random` reseeds itself in a forked child
            count = [0]

            def counted(real):
                def call(*args, **kwargs):
                    count[0] += 1
                    if count[0] == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)
                return call

            for name in EVENTS:
                setattr(os, name, counted(getattr(os, name)))
            work()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the save failed in the child process"
    return False


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def tiny_policy(seed: int, scale: float):
    torch.manual_seed(seed)
    stats = {"observation.state": {"mean": torch.full((3,), scale), "std": torch.ones(3)},
             "action": {"mean": torch.zeros(3), "std": torch.full((3,), scale)}}
    return make_policy(get_preset("tiny"), stats)


@pytest.fixture(scope="module")
def policies():
    return tiny_policy(0, 1.0), tiny_policy(1, 2.0)


def test_save_pretrained_over_a_checkpoint_is_all_old_or_all_new_whenever_killed(
        policies, tmp_path):
    old_policy, new_policy = policies
    old = files(old_policy.save_pretrained(tmp_path / "ref-old"))
    new = files(new_policy.save_pretrained(tmp_path / "ref-new"))
    assert old != new
    seen = []
    for n in range(1, 100):
        root = tmp_path / f"kill-{n}"
        root.mkdir()
        d = shutil.copytree(tmp_path / "ref-old", root / "ckpt")
        killed = killed_before_event(n, lambda d=d: new_policy.save_pretrained(d))
        got = files(resolve_checkpoint(d))
        assert got in (old, new), f"killed before file-system call {n}: a mixed checkpoint"
        seen.append("old" if got == old else "new")
        loaded = load_policy(d, device="cpu")
        assert loaded.config == new_policy.config
        # the next save finishes what the killed one left, and leaves nothing else behind
        new_policy.save_pretrained(d)
        assert files(d) == new and sorted(p.name for p in root.iterdir()) == ["ckpt"]
        if not killed:
            break
    else:
        pytest.fail("the save never finished")
    assert seen[-1] == "new" and "old" in seen and n > 5, seen


def test_first_save_killed_leaves_no_checkpoint(policies, tmp_path):
    _, new_policy = policies
    d = tmp_path / "ckpt"
    assert killed_before_event(3, lambda: new_policy.save_pretrained(d))
    assert not d.exists()
    with pytest.raises(FileNotFoundError, match=r"config.json: no such file"):
        load_policy(d)


def _optimizer(policy, steps: int) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for _ in range(steps):
        for p in policy.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    return opt


@pytest.mark.parametrize("step", [3, 4], ids=["over-an-existing-step", "a-new-step"])
def test_training_checkpoint_is_all_old_or_all_new_whenever_killed(policies, tmp_path, step,
                                                                    monkeypatch):
    # CPU RNG states only: a forked child must not touch CUDA (the parent may have used it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    old_policy, new_policy = policies
    old_opt, new_opt = _optimizer(old_policy, 1), _optimizer(new_policy, 2)
    template = tmp_path / "template"
    for s in (1, 2, 3):
        save_checkpoint(template, s, old_policy, old_opt, keep=3)
    old = files(last_checkpoint(template))
    ref = tmp_path / "ref-new"
    shutil.copytree(template, ref)
    save_checkpoint(ref, step, new_policy, new_opt, keep=2)
    new = files(last_checkpoint(ref))
    assert old != new
    kept = sorted(p.name for p in (ref / "checkpoints").iterdir())
    seen = []
    for n in range(1, 200):
        run = shutil.copytree(template, tmp_path / f"kill-{n}")
        killed = killed_before_event(
            n, lambda run=run: save_checkpoint(run, step, new_policy, new_opt, keep=2))
        got = files(last_checkpoint(run))
        assert got in (old, new), f"killed before file-system call {n}: a mixed checkpoint"
        seen.append("old" if got == old else "new")
        save_checkpoint(run, step, new_policy, new_opt, keep=2)
        assert files(last_checkpoint(run)) == new
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == kept
        if not killed:
            break
    else:
        pytest.fail("the save never finished")
    assert seen[-1] == "new" and "old" in seen and n > 5, seen


def test_resolve_checkpoint_names_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json: no such file.*run.json"):
        resolve_checkpoint(tmp_path)


def test_the_source_never_unpickles():
    """No pickle anywhere; ``torch.load`` only as ``weights_only=True`` in the same call
    (tensors only: OpenVLA-OFT's ``.pt`` heads)."""
    src = Path(__file__).resolve().parents[1] / "src" / "memvla"
    pattern = re.compile(r"torch\.load\((?![^)]*weights_only=True)|import pickle|pickle\.load|"
                         r"allow_pickle\s*=\s*True|weights_only\s*=\s*False")
    hits = [f"{p.relative_to(src)}:{i + 1}" for p in sorted(src.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert hits == []
    assert pattern.search("x = torch.load(f)") and pattern.search("torch.load(f, mmap=True)")
    assert not pattern.search('torch.load(f, map_location="cpu", weights_only=True)')
