"""Loading Hugging Face models by hub id or local path, offline unless allowed.

Shared by the language and audio extractors: one place for the offline rule,
the dtype choice, and the fingerprint that keys the feature cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

from ..errors import MissingInputError, TemporaryFailure, UsageError

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_dtype(name: str | None, device: str):
    """``auto`` gives bfloat16 on a GPU that supports it (else float16) and float32 on the CPU."""
    import torch

    if name in (None, "", "auto"):
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise UsageError(f"dtype {name!r}: choose auto, float32, float16 or bfloat16")
    return getattr(torch, _DTYPES[name])


def from_pretrained(loader, name: str, *, allow_download: bool, revision: str | None = None, **kwargs):
    """``loader.from_pretrained(name)`` with hub access only when ``allow_download``.

    A model that is neither a local folder nor in the local Hugging Face cache is a
    missing input (exit 66), with the way to fetch it.
    """
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise UsageError(f"model {name}: a model is a folder (save_pretrained) or a hub id, not a file")
    if not local.exists() and _is_path(name):
        raise MissingInputError(f"model folder {local} does not exist; give a folder written by save_pretrained "
                                "(or hf download --local-dir), or a hub id such as facebook/opt-125m")
    try:
        with quiet_transformers():
            return loader.from_pretrained(str(local) if local.is_dir() else name, revision=revision,
                                          local_files_only=not allow_download, **kwargs)
    except OSError as err:
        if local.is_dir():
            raise MissingInputError(f"model folder {local} cannot be loaded: {str(err).splitlines()[0]}") from None
        raise MissingInputError(
            f"model {name} is not available offline; fetch it once where there is internet "
            f"(`hf download {name} --local-dir DIR/{name}`, then pass --model-dir DIR) or rerun with "
            "--allow-download"
        ) from None


def _is_path(name: str) -> bool:
    """A name that can only be a file-system path: hub ids are ``name`` or ``org/name``."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def model_fingerprint(name: str, config, revision: str | None = None) -> str:
    """A short hash that changes when the model's weights or configuration change.

    Hub models in the local cache are identified by their snapshot (commit) hash;
    local folders by a hash of their weight files' contents.
    """
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    folder = Path(getattr(config, "_name_or_path", "") or name).expanduser()
    commit = getattr(config, "_commit_hash", None)
    if commit:
        h.update(f"commit:{commit}".encode())
    elif folder.is_dir():
        h.update(weights_hash(folder).encode())
    else:
        h.update(f"{name}@{revision}".encode())
    return h.hexdigest()[:16]


def weights_hash(folder: Path) -> str:
    """SHA-256 over the weight files of a model folder, memoised by size and mtime."""
    files = sorted(p for p in folder.iterdir()
                   if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
                   or p.name.endswith(".safetensors.index.json"))
    h = hashlib.sha256()
    for path in files:
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}".encode())
        h.update(_file_digest(path, st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()


_DIGESTS: dict[tuple, str] = {}


def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    key = (str(path), size, mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def count_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def slug(text: str) -> str:
    """A folder-safe name for a model id or path."""
    base = os.path.basename(text.rstrip("/")) if os.sep in text and Path(text).exists() else text
    return "".join(c if c.isalnum() or c in "-." else "_" for c in base).strip("_") or "model"


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """Layer selection: ``all``, ``last``, ``3``, ``0-4``, ``1,3,5-7``, negative from the end.

    Layer 0 is the embedding output and ``n_layers`` the last block, so there are
    ``n_layers + 1`` hidden states.
    """
    if spec in (None, "", "all"):
        return list(range(n_layers + 1))
    chosen: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if part == "last":
                chosen.append(n_layers)
            elif "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                chosen.extend(range(int(a), int(b) + 1))
            else:
                value = int(part)
                chosen.append(value + n_layers + 1 if value < 0 else value)
        except ValueError:
            raise UsageError(f"layers={spec!r}: use all, last, N, A-B or a comma list") from None
    bad = [c for c in chosen if not 0 <= c <= n_layers]
    if bad:
        raise UsageError(f"layers={spec!r}: the model has hidden states 0..{n_layers}; {bad} out of range")
    return sorted(set(chosen))


def run_with_oom_retry(run, batch, what: str) -> None:
    """``run(batch)``; on GPU out-of-memory, run its halves instead, down to one item."""
    import torch

    try:
        run(batch)
    except torch.cuda.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) == 1:
            raise TemporaryFailure(
                f"GPU out of memory for a single item ({what}); free the GPU, lower the batch size,"
                " use dtype=bfloat16, or spread the model with device_map=auto") from None
        log.warning("GPU out of memory for a batch of %d: retrying in halves", len(batch))
        half = len(batch) // 2
        run_with_oom_retry(run, batch[:half], what)
        run_with_oom_retry(run, batch[half:], what)


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' own progress bars (loading, saving weights), restoring the previous state."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
