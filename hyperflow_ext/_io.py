"""Cache directory and atomic, pickle-free checkpoint I/O.

Every file that matters is written to a temporary file in the destination folder and
renamed into place, so an interrupted run never leaves a half-written checkpoint.
Tensors are stored with safetensors; metadata is a flat ``str -> str`` mapping.

Files cannot lie: safetensors notices a truncated file, but not a flipped byte in a tensor or in
the metadata, so :func:`save_tensors` stores a SHA-256 of everything it wrote (every tensor's name,
dtype, shape and bytes, and the metadata) and :func:`load_tensors` refuses a file whose content
does not match it, naming the file. Files written before the checksum existed (metadata ``json``
only) still load.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import torch

__all__ = ["cache_dir", "atomic_path", "save_tensors", "load_tensors", "content_checksum"]

_ENV_CACHE = "HYPERFLOW_CACHE"


def cache_dir(override: Optional[os.PathLike] = None) -> Path:
    """Return (and create) the cache directory.

    Resolution order: ``override`` → ``$HYPERFLOW_CACHE`` → ``$XDG_CACHE_HOME/hyperflow`` →
    ``~/.cache/hyperflow``.
    """
    if override is not None:
        path = Path(override)
    elif os.environ.get(_ENV_CACHE):
        path = Path(os.environ[_ENV_CACHE])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "hyperflow"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(path: os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    Example:
        >>> with atomic_path("model.safetensors") as tmp:
        ...     write_somehow(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_CHECKSUM = "sha256"


def content_checksum(tensors: Mapping[str, torch.Tensor], meta_json: str) -> str:
    """SHA-256 over the metadata string and every tensor's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(repr((name, str(t.dtype), tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tensors(path: os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Atomically write ``tensors`` (and JSON-serialisable ``metadata``) as safetensors, with a checksum."""
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta_json = json.dumps(dict(metadata or {}), sort_keys=True)
    meta = {"json": meta_json, _CHECKSUM: content_checksum(flat, meta_json)}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)
    return Path(path)


def load_tensors(path: os.PathLike, device: str | torch.device = "cpu"
                 ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Load a file written by :func:`save_tensors`; returns ``(tensors, metadata)``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a readable safetensors file (truncated, say), or its content
            does not match the checksum it was written with (a flipped byte); the message names the file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_tensors: no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            stored = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"load_tensors: {path} is not a valid safetensors file: {exc}") from exc
    raw = stored.pop("json", "{}")
    digest = stored.pop(_CHECKSUM, None)
    if stored:  # a damaged key, or not a file of ours
        raise ValueError(f"load_tensors: {path} is corrupt or not a hyperflow file: unexpected metadata keys "
                         f"{sorted(stored)}")
    if digest is not None and digest != content_checksum(tensors, raw):
        raise ValueError(f"load_tensors: {path} is corrupt: its content does not match the checksum it was "
                         f"written with (the file was damaged or edited after it was saved); delete or restore it")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"load_tensors: {path} is corrupt: unreadable metadata ({exc})") from exc
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


def tensor_digest(tensors: Iterable[torch.Tensor], length: int = 12) -> str:
    """Hex digest of tensors' dtypes, shapes and bytes, in order (a cache or resume key)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:length]
