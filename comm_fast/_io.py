"""Writing model directories so that an interruption never leaves a half-written one in place."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import torch


@contextlib.contextmanager
def atomic_directory(directory):
    """Yield a temporary sibling directory; on success it replaces ``directory`` by renames, on
    failure (or interruption) it is removed and ``directory`` is left as it was."""
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(directory):
            old = tmp + "-old"
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, path, metadata={"format": "pt"})


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to a temporary sibling file and rename it over ``path``: readers see the old
    file or the whole new one, never a part."""
    path = os.path.abspath(os.fspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
