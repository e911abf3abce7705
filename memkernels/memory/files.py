"""Writing memory files safely: atomic replacement and content checksums."""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Callable

import torch
from torch import Tensor


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """write(tmp_path) to a temporary file beside `path`, then rename it over
    `path`: a crash never leaves a half-written file under the real name."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def tensor_sha256(t: Tensor) -> str:
    data = t.contiguous().view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()
