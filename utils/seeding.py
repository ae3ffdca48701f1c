"""Seeds: the same seed gives the same image on the same machine."""

from __future__ import annotations

import random

import numpy as np
import torch


def make_generator(seed: int) -> torch.Generator:
    """A fresh CPU generator seeded with `seed`.

    Pass one per call (`pipe(..., generator=make_generator(0))`): a CPU generator draws the same
    noise on every device, so a seed reproduces on a GPU too; a generator reused across calls
    does not restart, so the second image differs from the first.
    """
    return torch.Generator("cpu").manual_seed(int(seed))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (for code that uses them)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
