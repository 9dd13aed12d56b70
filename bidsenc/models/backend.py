"""Device plumbing for the model solvers: tensors in, memory budgets, out-of-memory retries.

Arrays in, arrays out; nothing here knows about BIDS or files.  The solvers in
:mod:`bidsenc.models.ridge` run in torch on ``"cpu"`` or ``"cuda"`` devices and accept
numpy arrays or torch tensors.  Work over voxels is cut into batches whose size comes from
the memory that is free on the GPU (``torch.cuda.mem_get_info``) or from a budget on the
CPU; a batch that runs out of GPU memory is retried at half its size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

# CPU working-memory budget when the caller gives none: this share of the available RAM,
# capped at _CPU_BUDGET_CAP bytes (beyond a few GiB larger voxel batches gain nothing).
_CPU_BUDGET_SHARE = 0.5
_CPU_BUDGET_CAP = 4 * 2**30
# Share of the free GPU memory that voxel batches may use (the rest is slack for the
# caching allocator and library workspaces).
_GPU_BUDGET_SHARE = 0.8


def _torch():
    import torch

    return torch


def torch_dtype(dtype):
    """The torch floating dtype for ``"float32"`` / ``"float64"`` (or a torch/numpy dtype)."""
    torch = _torch()
    if isinstance(dtype, torch.dtype):
        out = dtype
    else:
        out = {"float32": torch.float32, "float64": torch.float64}.get(np.dtype(dtype).name)
    if out not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return out


def resolve_device(device):
    """A ``torch.device`` for ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or a device); CUDA must exist."""
    torch = _torch()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but no CUDA GPU is visible to PyTorch")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def host_tensor(x, name: str):
    """Wrap ``x`` (numpy array, array-like or tensor) as a 2-D torch tensor without copying if possible.

    Returns ``(tensor, was_numpy)``.  Integer and boolean arrays are accepted and converted
    later, batch by batch, with the solver's dtype.
    """
    torch = _torch()
    if isinstance(x, torch.Tensor):
        t, was_numpy = x, False
    else:
        array = np.asarray(x)
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise TypeError(f"{name} must be real-valued, got dtype {array.dtype}")
        t, was_numpy = torch.from_numpy(np.ascontiguousarray(array)), True
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples x columns), got shape {tuple(t.shape)}")
    return t, was_numpy


def memory_budget(device, mem_gb: float | None = None) -> int:
    """Bytes that voxel batches may use on ``device`` now.

    On a GPU: ``mem_gb`` if given, else 80% of the memory free on the device (what the
    driver reports free plus what PyTorch's caching allocator holds unused).  On the CPU:
    ``mem_gb`` if given, else half the available RAM capped at 4 GiB.
    """
    torch = _torch()
    device = torch.device(device)
    if mem_gb is not None:
        if mem_gb <= 0:
            raise ValueError(f"mem_gb must be positive, got {mem_gb}")
        return int(mem_gb * 2**30)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(_GPU_BUDGET_SHARE * (free + cached))
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        available = 8 * 2**30
    return int(min(_CPU_BUDGET_CAP, _CPU_BUDGET_SHARE * available))


def _oom_probe(n_items: int) -> None:
    """Called with the size of every batch before it runs; a test hook for the OOM retry path.

    Does nothing.  Tests replace it (monkeypatch) with a function that raises
    ``torch.cuda.OutOfMemoryError`` above some size, which exercises the retry on CPU.
    """


def run_batched(step: Callable[[int, int], None], n_items: int, batch: int, what: str = "batch") -> int:
    """Run ``step(start, stop)`` over ``range(n_items)`` in batches, halving on GPU out-of-memory.

    ``step`` must be idempotent for a given range (it writes its results into
    preallocated outputs), because a batch that fails is rerun from its start with half
    the size.  A batch of one item that still runs out of memory re-raises the error.

    Returns the batch size in use at the end, so that the next pass over the voxels starts
    with a size known to fit.
    """
    torch = _torch()
    start = 0
    batch = max(1, int(batch))
    while start < n_items:
        stop = min(n_items, start + batch)
        failed = False
        try:
            _oom_probe(stop - start)
            step(start, stop)
        except torch.cuda.OutOfMemoryError:
            if stop - start <= 1:
                raise
            failed = True
        if failed:
            # Outside the except block, so the failed frame's tensors are already released.
            batch = max(1, (stop - start) // 2)
            log.warning("%s of %d voxels ran out of GPU memory; retrying at %d", what, stop - start, batch)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = stop
    return batch


@contextlib.contextmanager
def matmul_tf32(device, allow: bool):
    """Allow (or forbid) TF32 tensor-core matmuls on a CUDA device inside the block; restore after.

    On the CPU this does nothing (TF32 is a CUDA feature).
    """
    torch = _torch()
    if torch.device(device).type != "cuda":
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32 = before
