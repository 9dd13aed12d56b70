"""Choosing the compute device once, at the start of a run, and saying which it is."""

from __future__ import annotations

import logging

from .errors import TemporaryFailure

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    """Return ``"cuda"`` or ``"cpu"`` for ``--device auto|cuda|cpu`` and log what was found.

    Asking for ``cuda`` where no GPU is visible is an error (exit 75: on a shared
    node the GPU may be busy or not yet granted, and a rerun may succeed); silently
    running on the CPU would turn a GPU job into a days-long one.
    """
    import torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise TemporaryFailure(
            "--device cuda: no CUDA GPU is visible to PyTorch; in containers pass --gpus all (Docker) "
            "or --nv (Apptainer/Singularity), or run with --device cpu"
        )
    device = "cuda" if requested in ("cuda", "auto") and available else "cpu"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        log.info("device: %s (CUDA %s, %.1f GiB), %d GPU(s) visible", props.name, torch.version.cuda,
                 props.total_memory / 2**30, torch.cuda.device_count())
    else:
        log.info("device: CPU, %d thread(s)%s", torch.get_num_threads(),
                 "" if requested == "cpu" else "; no CUDA GPU visible")
    return device
