"""Helpers shared by the course notebooks.

Nothing here imports diffusers or transformers at import time, so that `setup_notebook()` can set
the Hugging Face environment (offline mode, verbosity) before they are first imported.
"""

from .device import get_device, get_dtype
from .images import (
    check_image_size,
    image_grid,
    latents_to_pil,
    pil_to_latents,
    pil_to_tensor,
    show_images,
    tensor_to_pil,
    to_pil,
)
from .models import REGISTRY, OfflineModelError, describe, load_pipeline, resolve_model
from .notebook import setup_notebook
from .seeding import make_generator, seed_everything

__all__ = [
    "REGISTRY",
    "OfflineModelError",
    "check_image_size",
    "describe",
    "get_device",
    "get_dtype",
    "image_grid",
    "latents_to_pil",
    "load_pipeline",
    "make_generator",
    "pil_to_latents",
    "pil_to_tensor",
    "resolve_model",
    "seed_everything",
    "setup_notebook",
    "show_images",
    "tensor_to_pil",
    "to_pil",
]
