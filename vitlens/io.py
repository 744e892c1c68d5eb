"""Atomic output: every file vitlens writes appears complete or not at all (temporary file, fsync, rename)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vitlens.errors import VitlensError


def writes_files() -> bool:
    """Whether this process writes output: always in a single process; under torch.distributed only rank 0, so
    that N ranks holding the same result leave one set of files (the others go through the motions and discard)."""
    from vitlens.distributed import is_main

    return is_main()


def ensure_out_dir(out: str | os.PathLike) -> Path:
    """Create the output directory (and parents), with one-line errors for the usual ways this fails (on ranks
    other than 0 of a distributed job: only the path, nothing is created)."""
    out = Path(out).expanduser()
    if not writes_files():
        return out
    if out.exists() and not out.is_dir():
        raise VitlensError(f"--out {out} is an existing file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VitlensError(f"cannot create output directory {out}: {e.strerror or e}")
    if not os.access(out, os.W_OK | os.X_OK):
        raise VitlensError(f"output directory {out} is not writable")
    return out


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``.

    If the body raises (or the process dies), ``path`` keeps its previous content or stays absent, and the
    temporary file is removed (a hard kill may leave a ``.tmp`` file, never a truncated ``path``).
    """
    path = Path(path)
    if not writes_files():  # ranks other than 0: the writer writes into a scratch file that is then dropped
        with tempfile.TemporaryDirectory(prefix="vitlens-rank-") as scratch:
            yield Path(scratch) / path.name
        return
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise VitlensError(f"cannot write {path}: {e.strerror or e}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp (and some writers, e.g. safetensors) create 0600; give the file what open() would: 0666 - umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise VitlensError(f"cannot write {path}: {e.strerror or e}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return Path(path)
