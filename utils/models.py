"""One model registry for the course, and `load_pipeline(task, model)`.

Every task has the bundled mini model (trained by this project on the toy world, offline, runs on a
CPU) and/or a real Stable Diffusion checkpoint on a maintained hub mirror. One switch chooses:

    load_pipeline("text-to-image")                 # "auto": real on an online CUDA GPU, else mini
    load_pipeline("text-to-image", model="mini")   # always the bundled model
    COURSE_MODEL=real jupyter lab                  # the same switch as an environment variable

Offline, "auto" never waits on the network, and asking for a real checkpoint that is not in the
local Hugging Face cache is a clear error that names the bundled alternative.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .device import get_device, get_dtype

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "models"
MODEL_ENV = "COURSE_MODEL"
CHOICES = ("auto", "mini", "real")


@dataclass(frozen=True)
class ModelEntry:
    task: str
    kind: str  # "mini" (bundled, a folder in models/) or "real" (a hub repository id)
    source: str
    pipeline: str  # the diffusers pipeline class that loads it
    note: str = ""

    @property
    def bundled(self) -> bool:
        return self.kind == "mini"

    @property
    def build_script(self) -> str:
        """The script in scripts/ that builds this bundled model."""
        return "build_mini_sd.py" if self.source == "mini-sd" else "build_mini_tasks.py"

    @property
    def path(self) -> Path | str:
        return MODELS_DIR / self.source if self.bundled else self.source


REGISTRY: dict[str, dict[str, ModelEntry]] = {
    "text-to-image": {
        "mini": ModelEntry("text-to-image", "mini", "mini-sd", "StableDiffusionPipeline",
                           "bundled mini SD trained on the toy world (64x64 images)"),
        "real": ModelEntry("text-to-image", "real", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                           "StableDiffusionPipeline", "Stable Diffusion 1.5 (512x512 images)"),
    },
    "image-to-image": {
        "mini": ModelEntry("image-to-image", "mini", "mini-sd", "StableDiffusionImg2ImgPipeline",
                           "bundled mini SD trained on the toy world (64x64 images)"),
        "real": ModelEntry("image-to-image", "real", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                           "StableDiffusionImg2ImgPipeline", "Stable Diffusion 1.5"),
    },
    "inpainting": {
        "mini": ModelEntry("inpainting", "mini", "mini-sd-inpainting", "StableDiffusionInpaintPipeline",
                           "bundled mini SD inpainting (9-channel UNet, 64x64 images); "
                           "built by scripts/build_mini_tasks.py"),
        "real": ModelEntry("inpainting", "real", "stable-diffusion-v1-5/stable-diffusion-inpainting",
                           "StableDiffusionInpaintPipeline", "SD 1.5 inpainting (9-channel UNet)"),
    },
    "depth-to-image": {
        "mini": ModelEntry("depth-to-image", "mini", "mini-sd-depth", "StableDiffusionDepth2ImgPipeline",
                           "bundled mini SD depth-to-image (5-channel UNet + tiny DPT, 64x64 images); "
                           "built by scripts/build_mini_tasks.py"),
        "real": ModelEntry("depth-to-image", "real", "sd2-community/stable-diffusion-2-depth",
                           "StableDiffusionDepth2ImgPipeline", "SD 2 depth (5-channel UNet)"),
    },
}


class OfflineModelError(RuntimeError):
    """A hub checkpoint was asked for, but the hub cannot be reached and it is not cached."""


def _is_offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 2.0) -> bool:
    """True if huggingface.co answers within `timeout` seconds (never waits longer, DNS included)."""
    if _is_offline_env():
        return False
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def resolve_model(task: str = "text-to-image", model: str | None = None) -> ModelEntry:
    """The registry entry that `load_pipeline` would load, without loading anything.

    `model` is "auto", "mini" or "real"; None reads the COURSE_MODEL environment variable
    (default "auto": the real checkpoint only on a CUDA GPU with the hub reachable).
    """
    if task not in REGISTRY:
        raise ValueError(f"unknown task {task!r}; valid tasks: {list(REGISTRY)}")
    choice = (model or os.environ.get(MODEL_ENV) or "auto").strip().lower()
    if choice not in CHOICES:
        raise ValueError(
            f"unknown model {choice!r}; valid choices: {list(CHOICES)} (argument `model` or the "
            f"{MODEL_ENV} environment variable)"
        )
    entries = REGISTRY[task]
    if choice == "auto":
        choice = "real" if torch.cuda.is_available() and hub_reachable() else "mini"
        if choice == "mini" and "mini" not in entries:
            choice = "real"
    if choice not in entries:
        raise ValueError(
            f"there is no {choice} model for {task!r} yet; available: {sorted(entries)} "
            f"({', '.join(str(e.source) for e in entries.values())})"
        )
    return entries[choice]


def load_pipeline(
    task: str = "text-to-image",
    model: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress_bar: bool = False,
    **kwargs,
):
    """Load the diffusers pipeline for `task` ("text-to-image", "image-to-image", "inpainting",
    "depth-to-image") from the bundled mini model or a real checkpoint (see `resolve_model`).

    Weights are loaded as safetensors only. Device and dtype default to `get_device()` and
    `get_dtype(device)`: float32 on a CPU, float16 on an accelerator. Other keyword arguments
    (`cache_dir`, `variant`, ...) go to `from_pretrained`.
    """
    import diffusers

    entry = resolve_model(task, model)
    device = torch.device(device) if device is not None else get_device()
    dtype = dtype or get_dtype(device)
    pipeline_cls = getattr(diffusers, entry.pipeline)
    kwargs.update(torch_dtype=dtype, use_safetensors=True)
    if entry.bundled:
        if not (entry.path / "model_index.json").exists():
            raise FileNotFoundError(
                f"the bundled model is missing at {entry.path}; rebuild it with "
                f"`python scripts/{entry.build_script}`"
            )
        pipe = pipeline_cls.from_pretrained(entry.path, **kwargs)
    else:
        if not hub_reachable():
            try:  # the real checkpoint may already be in the local Hugging Face cache
                pipe = pipeline_cls.from_pretrained(entry.source, local_files_only=True, **kwargs)
            except (OSError, ValueError) as err:
                alternative = REGISTRY[task].get("mini")
                hint = (f"use the bundled model instead: load_pipeline({task!r}, model='mini') or "
                        f"{MODEL_ENV}=mini" if alternative else "no bundled model exists for this task yet")
                raise OfflineModelError(
                    f"{entry.source} is not in the local cache and the Hugging Face hub cannot be "
                    f"reached (offline); {hint}"
                ) from err
        else:
            pipe = pipeline_cls.from_pretrained(entry.source, **kwargs)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe


def describe(pipe) -> str:
    """One line saying which model a pipeline is and at what size it works."""
    source = str(pipe.config._name_or_path)
    kind = "bundled mini model" if Path(source).resolve().is_relative_to(MODELS_DIR) else "hub checkpoint"
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return (f"{type(pipe).__name__}: {kind} {Path(source).name if kind.startswith('bundled') else source}"
            f", {size}x{size} images, on {pipe.device} in {pipe.dtype}")
