"""Writing memory files safely: atomic replacement, durable (fsync), with
the umask's permissions, leftovers of killed writes cleaned; checksums."""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
from typing import Callable

import torch
from torch import Tensor

_TMP = ".tmp-"  # temporary files: .tmp-<pid>-<random>, beside their target


def _umask() -> int:
    try:  # read without setting it: os.umask() would race with other threads' files
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(directory: str, prefix: str) -> None:
    """Removes `prefix<pid>-*` entries of `directory` whose process is gone
    (what a write killed half-way left behind)."""
    for path in glob.glob(os.path.join(directory, glob.escape(prefix) + "*")):
        pid = os.path.basename(path)[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass


def fsync_directory(directory: str) -> None:
    """Makes the directory's entries (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """write(tmp_path) to a temporary file beside `path`, fsync it, then rename
    it over `path` and fsync the directory: a crash never leaves a half-written
    file under the real name. The file gets the umask's permissions (not
    mkstemp's 0600); temporary files of killed writes are removed."""
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale(directory, _TMP)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP}{os.getpid()}-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        fsync_directory(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def tensor_sha256(t: Tensor) -> str:
    data = t.contiguous().view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()
