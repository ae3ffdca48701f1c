"""Shared test setup: offline, quiet, and the bundled models' location."""

import os
import sys
from pathlib import Path

# before any Hugging Face import: nothing in the tests may touch the network
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("COURSE_MODEL", None)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

MINI_SD = ROOT / "models" / "mini-sd"
MINI_CLIP = ROOT / "models" / "mini-clip"


@pytest.fixture(scope="session")
def mini_pipe():
    """The bundled text-to-image pipeline, loaded once, exactly as a learner loads it."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MINI_SD)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_vae():
    """A small random AutoencoderKL (8x per side, 4 latent channels) for helper tests."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
        sample_size=32, scaling_factor=0.5,
    )
    return vae.eval()
