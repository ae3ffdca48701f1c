"""Device and dtype choice: CUDA, then Apple's MPS, then the CPU."""

from __future__ import annotations

import torch


def get_device(prefer: str | None = None) -> torch.device:
    """The best available device, or `prefer` ("cuda", "mps", "cpu") when given.

    Raises a ValueError naming what is available if `prefer` is not.
    """
    available = ["cpu"]
    if torch.backends.mps.is_available():
        available.insert(0, "mps")
    if torch.cuda.is_available():
        available.insert(0, "cuda")
    if prefer is None:
        return torch.device(available[0])
    if prefer not in available:
        raise ValueError(f"device {prefer!r} is not available here; available: {available}")
    return torch.device(prefer)


def get_dtype(device: torch.device | str) -> torch.dtype:
    """float16 on accelerators (half the memory, much faster), float32 on the CPU.

    CPUs run half precision slowly or not at all, so the CPU always gets float32.
    """
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16
