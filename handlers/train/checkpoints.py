"""Crash-safe checkpoints: write into a temp dir, fsync, manifest last, rename into place; verify on resume.

A checkpoint directory ``step-00000120`` is complete only if its ``manifest.json`` exists and every file it
lists has the recorded size and sha256. Anything else (a ``.tmp-*`` dir from a crash during the write, a
torn or altered file) is skipped with a warning and renamed aside so it is never trusted later.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from trainbox.fsio import fsync_dir, fsync_folders, write_json_atomically

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ROLLING_KINDS = ("rolling", "emergency")  # rotated; "epoch" and "final" are kept
KINDS = (*ROLLING_KINDS, "epoch", "final")
HASH_THREADS = 4


@dataclass
class Checkpoint:
    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_and_hash(path: Path) -> str:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
    return _sha256(path)


def write_checkpoint_atomically(root: Path, step: int, kind: str, write_files: Callable[[Path], None],
                                extra: dict[str, Any] | None = None) -> Checkpoint:
    """Call ``write_files(tmp_dir)``, fsync everything, write the manifest last, rename to ``step-N``.

    If a checkpoint for ``step`` already exists it is reused; a kept kind (epoch/final) upgrades its manifest.
    """
    assert kind in KINDS, kind
    root.mkdir(parents=True, exist_ok=True)
    target = root / checkpoint_name(step)
    existing = verify_checkpoint(target) if target.exists() else None
    if existing is not None:
        if kind not in ROLLING_KINDS and existing.kind in ROLLING_KINDS:
            existing.manifest["kind"] = kind
            write_json_atomically(target / MANIFEST, existing.manifest)
        return existing
    if target.exists():
        _set_aside(target, "incomplete or corrupted")
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _write_into(tmp, step, kind, write_files, extra or {})
        os.rename(tmp, target)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. disk full: leave no half-written dir behind
        raise
    fsync_dir(root)
    return Checkpoint(target, manifest)


def _write_into(tmp: Path, step: int, kind: str, write_files: Callable[[Path], None],
                extra: dict[str, Any]) -> dict[str, Any]:
    write_files(tmp)
    paths = sorted(p for p in tmp.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:  # hashlib and fsync release the GIL
        digests = list(pool.map(_fsync_and_hash, paths))
    files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": d} for p, d in zip(paths, digests)}
    fsync_folders(tmp)
    manifest = {"step": step, "kind": kind, "time": time.time(), "files": files, **extra}
    write_json_atomically(tmp / MANIFEST, manifest)  # last: its presence means every file above is durable
    return manifest


def verify_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint at ``path`` if its manifest and every listed file check out, else None (with a reason)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("checkpoint %s has no readable manifest (%s): skipped", path.name, exc)
        return None
    def intact(rel: str) -> bool:
        file, meta = path / rel, files[rel]
        return file.is_file() and file.stat().st_size == meta["bytes"] and _sha256(file) == meta["sha256"]

    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        for rel, ok in zip(files, pool.map(intact, files)):
            if not ok:
                log.warning("checkpoint %s: %s is missing or does not match its manifest: skipped", path.name, rel)
                return None
    return Checkpoint(path, manifest)


def _set_aside(path: Path, why: str) -> None:
    target = path.with_name(f".broken-{path.name}-{int(time.time())}")
    log.warning("checkpoint %s is %s; moved to %s", path.name, why, target.name)
    os.rename(path, target)


def list_complete_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first; broken ones are set aside with a warning."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".tmp-"):
            log.warning("checkpoint %s was interrupted while being written: skipped and removed", path.name)
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith("step-") and path.is_dir():
            checkpoint = verify_checkpoint(path)
            if checkpoint is None:
                _set_aside(path, "incomplete or corrupted")
            else:
                found.append(checkpoint)
    return sorted(found, key=lambda c: c.step)


def newest_complete_checkpoint(root: Path) -> Checkpoint | None:
    complete = list_complete_checkpoints(root)
    return complete[-1] if complete else None


def _manifests(root: Path) -> list[Checkpoint]:
    """Checkpoints that have a manifest, oldest first (no hashing: cheap enough to run after every save)."""
    found = []
    for path in sorted(root.glob("step-*")):
        try:
            found.append(Checkpoint(path, json.loads((path / MANIFEST).read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda c: c.step)


def rotate_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` rolling/emergency checkpoints; epoch and final ones stay."""
    rolling = [c for c in _manifests(root) if c.kind in ROLLING_KINDS]
    removed = []
    for checkpoint in rolling[:-keep]:
        # rename first so a crash mid-delete never leaves a half-deleted dir that looks complete
        doomed = checkpoint.path.with_name(f".tmp-deleting-{checkpoint.path.name}")
        os.rename(checkpoint.path, doomed)
        shutil.rmtree(doomed)
        removed.append(checkpoint.path)
    if removed:
        fsync_dir(root)
    return removed
