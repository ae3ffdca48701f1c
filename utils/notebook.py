"""`setup_notebook()`: the one call at the top of every notebook.

It must run before the first `import diffusers` / `import transformers`: Hugging Face reads
HF_HUB_OFFLINE at import time.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from .device import get_device, get_dtype
from .models import resolve_model
from .seeding import seed_everything

QUIET_ENV = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    # warnings stay on for diffusers: it is the one that says which words a >77-token prompt lost
    "DIFFUSERS_VERBOSITY": "warning",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class CourseSetup:
    device: torch.device
    dtype: torch.dtype
    model: str  # "mini" or "real", what load_pipeline will load by default
    source: str  # folder or hub id of the text-to-image model

    def __str__(self) -> str:
        return f"device={self.device.type} dtype={self.dtype} model={self.model} ({self.source})"


def _png_only() -> None:
    """In a Jupyter kernel, show PIL images as PNG only (not PNG and JPEG): lighter notebooks."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and "image/jpeg" in shell.display_formatter.formatters:
        shell.display_formatter.formatters["image/jpeg"].enabled = False


def setup_notebook(seed: int = 0, model: str | None = None, task: str = "text-to-image") -> CourseSetup:
    """Make a notebook quiet and deterministic, choose the model, and say what was chosen.

    - offline mode (HF_HUB_OFFLINE=1) whenever the bundled model is used, so nothing waits on the
      network; progress bars and library chatter off (diffusers' warnings, such as a truncated
      prompt, stay on);
    - global seeds set (pass fresh generators to pipelines anyway: `make_generator(seed)`);
    - `model` ("auto", "mini", "real"; default: the COURSE_MODEL environment variable, else "auto")
      is resolved once and stored in COURSE_MODEL, so every later `load_pipeline` call agrees;
    - in Jupyter, PIL images are stored as PNG only (IPython would store a JPEG copy as well).
    """
    entry = resolve_model(task, model)
    os.environ["COURSE_MODEL"] = entry.kind
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if entry.bundled:
        os.environ["HF_HUB_OFFLINE"] = "1"
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_warning()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    _png_only()
    seed_everything(seed)
    device = get_device()
    return CourseSetup(device, get_dtype(device), entry.kind, str(entry.source))
