"""Files users drop, treated as untrusted: what kind of entry they are, and reading them with a cap.

Nothing here follows a link or opens anything but a regular file, so an inbox entry can never make
the daemon read outside its home, block in ``open()`` or read more than the size limit.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from trainbox.errors import InvalidInput, Problem

# errors that concern one file (its name, its kind), never the storage: the file is rejected, not retried
PER_FILE_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENAMETOOLONG", "EILSEQ", "EINVAL", "EISDIR", "ENOTDIR", "ELOOP", "ENXIO", "ENODEV", "EOVERFLOW",
    "EFBIG", "ETXTBSY") if hasattr(errno, name))
# longest name kept in rejected/ (255-byte file system limit, less room for '.<claim>' and '.error.txt')
MAX_KEPT_NAME_BYTES = 200
_KINDS = ((stat.S_ISLNK, "a symbolic link", "copy the file itself into the inbox (cp -L), not a link to it"),
          (stat.S_ISFIFO, "a named pipe (FIFO)", "write the data to a regular file and drop that"),
          (stat.S_ISSOCK, "a socket", "drop regular files only"),
          (stat.S_ISCHR, "a character device", "drop regular files only"),
          (stat.S_ISBLK, "a block device", "drop regular files only"),
          (stat.S_ISDIR, "a directory", "drop the files inside it, one by one"))


def is_per_file_error(exc: OSError) -> bool:
    return exc.errno in PER_FILE_ERRNOS


def shown_name(name: str) -> str:
    """``name`` as printable text for the store, logs and messages: bytes that are not UTF-8 and control
    characters (a newline in a name would forge log lines) appear escaped, as \\xNN or \\n."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def not_regular_problem(mode: int) -> Problem | None:
    """Why an entry of this ``st_mode`` is not taken, or None for a regular file."""
    for test, kind, fix in _KINDS:
        if test(mode):
            return Problem(f"this is {kind}, not a regular file; trainbox did not open or follow it", fix=fix)
    return None if stat.S_ISREG(mode) else Problem("this is not a regular file", fix="drop regular files only")


def kept_name(name: str, explanation_suffix: str) -> str:
    """A name for ``rejected/`` that says what the file was, fits the file system, and can never be
    mistaken for (or replace) an explanation file."""
    raw = os.fsencode(name)
    if len(raw) > MAX_KEPT_NAME_BYTES:
        suffix = os.fsencode(Path(name).suffix)[:16]
        head = raw[: MAX_KEPT_NAME_BYTES - len(suffix) - 16].decode("utf-8", "ignore")
        name = f"{head}~shortened{os.fsdecode(suffix)}"
    if name.endswith(explanation_suffix):
        name = name[: -len(explanation_suffix)] + ".error-dropped.txt"
    return name


def read_capped(path: Path, limit: int, name: str, what: str, *, follow_links: bool = False) -> bytes:
    """Read a regular file of at most ``limit`` bytes; InvalidInput for anything else.

    The open never follows a link (unless ``follow_links``) and never blocks on a FIFO; the type and size
    are checked on the open descriptor, so a swap after an earlier check changes nothing.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise InvalidInput(name, [not_regular_problem(stat.S_IFLNK)], "not a regular file") from None
        if isinstance(exc, PermissionError):  # this file's mode, not the storage: the folder is ours
            raise InvalidInput(name, [Problem(f"cannot be read: {exc.strerror}",
                                              fix="make it readable (chmod u+r) and drop it again")],
                               "not readable") from None
        if is_per_file_error(exc):
            raise InvalidInput(name, [Problem(f"cannot be opened: {exc.strerror}",
                                              fix="drop a regular file")], "not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        problem = not_regular_problem(st.st_mode)
        if problem is not None:
            raise InvalidInput(name, [problem], "not a regular file")
        if st.st_size > limit:
            raise too_large(name, limit, what, st.st_size)
        chunks, total = [], 0
        while total <= limit:  # the file may grow while we read: the cap holds, not the stat
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise too_large(name, limit, what)
        return b"".join(chunks)
    finally:
        os.close(fd)


def too_large(name: str, limit: int, what: str, size: int | None = None) -> InvalidInput:
    fixes = {"dataset": f"split it into files under {limit / 1e6:g} MB, or raise limits.max_dataset_mb "
                        "in daemon.yaml",
             "job file": "a job file is a few lines of YAML; put data in a .jsonl dataset",
             "settings file": "daemon.yaml holds a few settings; remove what is not a setting"}
    shown = f"{size} bytes" if size is not None else "the file"
    return InvalidInput(name, [Problem(f"{shown} is over the {limit}-byte limit for a {what}; it was not read",
                                       fix=fixes.get(what))], "too large")
