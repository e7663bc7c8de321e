"""Durable file writes: temp file, flush, fsync, os.replace, fsync of the directory."""
from __future__ import annotations

import errno
import json
import os
import secrets
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside ``path`` durable (no-op where directories can't be opened)."""
    if os.name == "nt":
        return  # NTFS journals metadata; directories cannot be opened for fsync
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` so that a crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    _create_synced(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_new_file_durably(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data``; FileExistsError if it exists (never replaces a file)."""
    path = Path(path)
    _create_synced(path, data)
    fsync_dir(path.parent)


def _create_synced(path: Path, data: bytes) -> None:
    """Create ``path`` (FileExistsError if it exists) holding ``data`` on disk; removed again if that fails."""
    # os.open with 0o666 (not mkstemp's 0o600) so the umask decides, as for any ordinary file
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def fsync_tree(root: Path) -> None:
    """Make a folder written aside durable before it is renamed into place: every file, then every directory
    bottom-up (a directory's entries are durable only once the directory itself is fsynced)."""
    root = Path(root)
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_folders(root)


def fsync_folders(root: Path) -> None:
    """fsync every directory under ``root`` and ``root`` itself, deepest first."""
    for folder in sorted({p for p in Path(root).rglob("*") if p.is_dir()} | {Path(root)},
                         key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)


def write_text_atomically(path: Path, text: str) -> None:
    write_bytes_atomically(path, text.encode("utf-8"))


def write_json_atomically(path: Path, obj: Any) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    """Read a JSON file written by ``write_json_atomically``; ``default`` if it does not exist."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


def append_line_durably(path: Path, line: str) -> None:
    """Append one line (an event record) and fsync it; readers tolerate a torn last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line.rstrip("\n") + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def move_without_replacing(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` durably; FileExistsError if ``dst`` exists (nothing is overwritten).

    A hard link then unlink is the portable no-replace rename; where links are not supported (FAT,
    some shares) an existence check before the rename is the best available.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
    else:
        os.unlink(src)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def move_durably(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (same filesystem) and make both directories durable."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)
