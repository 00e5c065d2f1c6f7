"""Atomic writes: a temporary file in the same folder, then ``os.replace``.

An interrupted command never leaves a file that looks complete: either the old file (or none) or the whole
new one is there. The temporary file's name carries this host's tag and the writer's PID
(``.NAME.HOST-PID-XXXXXXXX.part.SUFFIX``), so that the first write of a later process into that folder removes
what a killed writer of this machine left (a live writer's, another host's and any other name are left alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

DEFAULT_FILE_MODE = 0o666
"""Mode of a newly created file before the umask is applied (what ``open(path, "w")`` gives)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def host_tag() -> str:
    """8 hex digits naming this machine in temporary names (a PID means nothing on another host)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (POSIX ``kill(pid, 0)``: no signal is sent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_SWEPT: set[Path] = set()
"""Folders this process has already cleaned of dead writers' temporaries (one scan per folder, not per file)."""


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove from ``folder`` the temporaries that killed writers of this machine left; returns those removed.

    Only names :func:`atomic_path` gives, with this host's tag and the PID of a process that no longer exists, are
    touched; nothing off POSIX (no way there to ask whether a PID is alive).
    """
    folder = Path(folder)
    if os.name != "posix" or not folder.is_dir():
        return []
    pattern = re.compile(rf"\.[^/]*\.{host_tag()}-(?P<pid>\d+)-[^./]+\.part(\.[^/]*)?")
    removed = []
    for tmp in sorted(folder.glob(f".*.{host_tag()}-*.part*")):
        m = pattern.fullmatch(tmp.name)
        if m is None or not tmp.is_file() or tmp.is_symlink():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    The temporary name keeps the suffixes (``.nii.gz``) so that writers choosing a format by suffix work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent not in _SWEPT:  # the first write of this process into a folder cleans it
        remove_stale_temporaries(path.parent)
        _SWEPT.add(path.parent)
    suffix = "".join(path.suffixes)
    prefix = f".{path.name.split('.')[0]}.{host_tag()}-{os.getpid()}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".part" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with contextlib.suppress(FileNotFoundError):  # mkstemp makes 0600; give the file the usual permissions
            os.chmod(tmp_path, DEFAULT_FILE_MODE & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsync before rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
