"""The build script's smoke mode rebuilds every stage into a temporary folder, and the result
loads with diffusers and goes through the evaluation script."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                    reason="open_clip_torch not installed (scripts/setup.sh --dev installs it)")
def test_smoke_build_then_evaluate(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    models = tmp_path / "models"
    build = subprocess.run(
        [sys.executable, "scripts/build_mini_sd.py", "--smoke", "--out", str(models),
         "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    for part in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"):
        assert (models / "mini-sd" / part).is_dir(), part
    assert (models / "mini-clip" / "model.safetensors").exists()
    scheduler_config = (models / "mini-sd" / "scheduler" / "scheduler_config.json").read_text()
    assert '"clip_sample": false' in scheduler_config
    # the tokenizer is saved as built, without the padding settings of the training calls
    for saved in (models / "mini-sd" / "tokenizer", models / "mini-clip"):
        config = (saved / "tokenizer_config.json").read_text()
        assert "truncation_strategy" not in config and '"max_length"' not in config, saved
    assert "resumed" not in build.stdout

    # a second run finds every stage done and rebuilds nothing
    again = subprocess.run(
        [sys.executable, "scripts/build_mini_sd.py", "--smoke", "--out", str(models),
         "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0 and "UNet (EMA weights) saved" not in again.stdout

    # the built VAE's decoder fine-tuned (its encoder frozen), small pointed shapes oversampled,
    # and nothing after it
    more = tmp_path / "more"
    shutil.copytree(models / "mini-clip", more / "mini-clip")  # kept: no CLIP stage to rerun
    shutil.copytree(models / "mini-sd" / "tokenizer", more / "mini-sd" / "tokenizer")
    continued = subprocess.run(
        [sys.executable, "scripts/build_mini_sd.py", "--smoke", "--out", str(more), "--work",
         str(tmp_path / "work_more"), "--vae-init", str(models / "mini-sd" / "vae"),
         "--vae-hard-weight", "3", "--vae-decoder-only", "1", "--until", "vae"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert "vae: starting from the weights in" in continued.stdout and "CLIP saved" not in continued.stdout
    assert not (more / "mini-sd" / "unet").exists() and not (more / "mini-sd" / "model_index.json").exists()
    from safetensors.torch import load_file

    before, after = (load_file(folder / "mini-sd" / "vae" / "diffusion_pytorch_model.safetensors")
                     for folder in (models, more))
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(before[k].float().equal(after[k].float()) for k in frozen)
    assert any(not before[k].float().equal(after[k].float()) for k in before if k.startswith("decoder."))
    configs = [json.loads((folder / "mini-sd" / "vae" / "config.json").read_text()) for folder in (models, more)]
    assert configs[0]["scaling_factor"] == configs[1]["scaling_factor"]  # same latents, same scale

    # the built CLIP continued with its text tower locked: the tower the UNet reads is kept
    # tensor for tensor, the vision tower and the text projection learn
    vision = tmp_path / "vision"
    shutil.copytree(models / "mini-sd" / "tokenizer", vision / "mini-sd" / "tokenizer")
    relearnt = subprocess.run(
        [sys.executable, "scripts/build_mini_sd.py", "--smoke", "--out", str(vision), "--work",
         str(tmp_path / "work_vision"), "--clip-init", str(models / "mini-clip"), "--clip-lock-text", "1",
         "--clip-lock-vision", "0", "--until", "clip"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert relearnt.returncode == 0, relearnt.stderr[-3000:]
    assert "clip: starting from the weights in" in relearnt.stdout and "CLIP saved" in relearnt.stdout
    assert not (vision / "mini-sd" / "vae").exists()
    before, after = (load_file(folder / "mini-clip" / "model.safetensors") for folder in (models, vision))
    text = [k for k in before if k.startswith("text_model.")]
    assert text and all(before[k].float().equal(after[k].float()) for k in text)
    for learnt in ("vision_model.", "text_projection."):
        assert any(not before[k].float().equal(after[k].float()) for k in before if k.startswith(learnt)), learnt

    # the candidate VAE is evaluated with the first build's UNet; never written over its metrics
    candidate = [sys.executable, "scripts/evaluate.py", "--models", str(models), "--prompts", "2",
                 "--images", "8", "--vae-more", "0", "--vae", str(more / "mini-sd" / "vae")]
    refused = subprocess.run(candidate, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "add --no-save" in refused.stderr
    checked = subprocess.run(candidate + ["--no-save"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "VAE round trips" in checked.stdout and "small star" in checked.stdout

    evaluate = subprocess.run(
        [sys.executable, "scripts/evaluate.py", "--models", str(models), "--prompts", "4",
         "--images", "20", "--vae-more", "12", "--no-save"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    for line in ("prompts.all", "vae.psnr", "vae_more.psnr", "vae_more.shape", "clip.colour", "clip.position",
                 "speed.seconds_per_image", "(vae_more: 12 more, another seed)"):
        assert line in evaluate.stdout

    # the pipeline's own scheduler and partial captions: measured on request, never saved as the metrics
    other = [sys.executable, "scripts/evaluate.py", "--models", str(models), "--prompts", "4",
             "--images", "8", "--vae-more", "0", "--steps", "5", "--scheduler", "pndm", "--partial"]
    refused = subprocess.run(other, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "add --no-save" in refused.stderr
    evaluate = subprocess.run(other + ["--no-save"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert "4 prompts (partial captions, PNDMScheduler, 5 steps, guidance 7.5)" in evaluate.stdout
    assert "vae_more" not in evaluate.stdout


def _build_module():
    """scripts/build_mini_sd.py as a module (its functions are tested directly)."""
    if "build_mini_sd" not in sys.modules:
        sys.path.insert(0, str(ROOT / "scripts"))
        spec = importlib.util.spec_from_file_location("build_mini_sd", ROOT / "scripts" / "build_mini_sd.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["build_mini_sd"] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules["build_mini_sd"]


def test_a_partial_caption_is_right_for_every_image_it_describes():
    import random
    from dataclasses import replace

    from utils.toyworld import sample_scene

    b = _build_module()
    red_star = sample_scene(random.Random(0), shape="star", colour="red", position="in the top left")
    other_place = replace(red_star, position=8)
    blue_star = replace(red_star, colour="blue")
    circle = replace(red_star, shape="circle")
    images = [red_star, other_place, blue_star, circle]
    only_colour = replace(red_star, mention=(False, True, False, False))  # "a red star"
    with_place = replace(red_star, mention=(False, True, True, False))  # "a red star in the top left"
    nothing = replace(red_star, mention=(False, False, False, False))  # "a star"
    assert only_colour.caption == "a red star"
    targets = b.contrastive_targets([only_colour, with_place, nothing], images)
    assert targets.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]


def test_hard_negative_batches_leave_one_kind_of_attribute_free_per_group():
    import random

    from utils.toyworld import make_scenes

    b = _build_module()
    scenes = make_scenes(3000, seed=0)
    keyings = b.hard_negative_groups(scenes)
    assert len(keyings) == len(b.HARD_NEGATIVE_KEYS)
    idx = b.grouped_batch(keyings, batch=160, group=16, rng=random.Random(0))
    assert len(idx) == 160
    fixed_sets = list(b.HARD_NEGATIVE_KEYS.values())
    seen = set()
    for start in range(0, 160, 16):
        group = [scenes[i] for i in idx[start : start + 16]]
        agree = [f for f in fixed_sets if len({tuple(getattr(s, a) for a in f) for s in group}) == 1]
        assert agree, "every group agrees on the attributes of one keying"
        seen.update(agree)
    assert len(seen) > 1, "the keyings are mixed within a batch"
    # the attributes left free do vary within a group keyed on all but position
    by_position = keyings[list(b.HARD_NEGATIVE_KEYS).index("position")]
    assert max(len({scenes[i].position for i in g}) for g in by_position) > 1


def test_padding_to_the_longest_caption_changes_no_text_state():
    """CLIP trains on captions padded to the longest one in the batch; SD pads to 77. The causal
    attention makes the two give the same token states and the same pooled state."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from tests.conftest import MINI_SD

    tokenizer = CLIPTokenizer.from_pretrained(MINI_SD / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(MINI_SD / "text_encoder", dtype=torch.float32).eval()
    captions = ["a red star", "a large blue circle in the top left on a gray background"]
    with torch.no_grad():
        short = encoder(**tokenizer(captions, padding="longest", return_tensors="pt"))
        full = encoder(**tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt"))
    n = short.last_hidden_state.shape[1]
    assert n < 20
    torch.testing.assert_close(short.last_hidden_state, full.last_hidden_state[:, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(short.pooler_output, full.pooler_output, atol=1e-5, rtol=0)


def test_vision_warmup_reads_every_attribute_from_the_pooled_state():
    import random

    import torch
    from transformers import CLIPModel, CLIPTokenizer

    from tests.conftest import MINI_SD
    from utils.toyworld import sample_scene

    b = _build_module()
    cfg = b.Config()
    tokenizer = CLIPTokenizer.from_pretrained(MINI_SD / "tokenizer")
    clip = CLIPModel(b.clip_configs(cfg, tokenizer))
    warm = b.VisionWarmup(clip.vision_model, cfg.text_hidden)
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(3)]
    labels = b.attribute_labels(scenes, "cpu")
    assert set(labels) == set(b.ATTRIBUTE_CLASSES) == {"shape", "colour", "size", "position",
                                                       "background"}
    for name, classes in b.ATTRIBUTE_CLASSES.items():
        for scene, label in zip(scenes, labels[name].tolist()):
            assert list(classes)[label] == getattr(scene, name)
    logits = warm(torch.zeros(3, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in logits.items()} == {
        k: (3, len(c)) for k, c in b.ATTRIBUTE_CLASSES.items()}
    # the heads are not part of CLIP: the vision tower is shared, not copied
    assert warm.vision_model is clip.vision_model


@pytest.mark.parametrize("which, weight, expected", [
    ("vae", 3.0, [3.0, 3.0, 2.0, 1.0]),   # small pointed shapes 3x, other small shapes half-way
    ("unet", 2.0, [2.0, 2.0, 2.0, 1.0]),  # every small shape 2x
])
def test_sampling_weights_favour_small_shapes_and_default_to_uniform(which, weight, expected):
    import random

    from utils.toyworld import sample_scene

    weights_of = getattr(_build_module(), f"{which}_sample_weights")
    rng = random.Random(0)
    scenes = [sample_scene(rng, shape=shape, size=size)
              for shape, size in [("star", "small"), ("triangle", "small"), ("circle", "small"), ("star", "large")]]
    assert np.allclose(weights_of(scenes, 1.0), 0.25)
    weights = weights_of(scenes, weight)
    assert np.isclose(weights.sum(), 1.0)
    assert np.allclose(weights / weights[3], expected)


def test_object_weights_cover_the_latent_cells_the_shape_is_drawn_in():
    from utils.toyworld import make_scenes, render_scene

    build = _build_module()
    scenes = make_scenes(200, seed=5)
    weights = build.object_weight_map(scenes, 4.0, 8)
    assert weights.shape == (200, 1, 8, 8) and set(weights.unique().tolist()) == {1.0, 4.0}
    for scene, w in zip(scenes, weights[:, 0].numpy()):
        drawn = (render_scene(scene)["mask"] > 0.5).reshape(8, 8, 8, 8).any(axis=(1, 3))
        assert (w[drawn] == 4.0).all(), scene.caption  # every cell holding the shape is weighted
        rows, cols = np.nonzero(w == 4.0)  # and nothing outside the square around its disc
        reach = scene.diameter / 2 * 8 + 0.5
        assert (abs(cols + 0.5 - scene.center[0] * 8) < reach).all(), scene.caption
        assert (abs(rows + 0.5 - scene.center[1] * 8) < reach).all(), scene.caption
    small = [(w == 4.0).sum() for s, w in zip(scenes, weights) if s.size == "small"]
    assert 3 <= min(small) and max(small) <= 16


def test_the_object_weighted_loss_is_the_plain_mean_at_weight_one_and_favours_the_object():
    import torch
    import torch.nn.functional as F

    build = _build_module()
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.allclose(build.weighted_mse(pred, target, None), F.mse_loss(pred, target))
    assert torch.allclose(build.weighted_mse(pred, target, torch.ones(2, 1, 8, 8)), F.mse_loss(pred, target))
    weights = torch.ones(2, 1, 8, 8)
    weights[:, :, :2, :2] = 5.0
    error = torch.zeros(2, 4, 8, 8)
    error[:, :, 0, 0] = 1.0  # one latent cell wrong, inside the weighted corner
    expected = (5.0 * 2 * 4) / (weights.sum() * 4)
    assert torch.isclose(build.weighted_mse(error, torch.zeros_like(error), weights), expected)
    assert build.weighted_mse(error, torch.zeros_like(error), weights) > F.mse_loss(error, torch.zeros_like(error))


def test_decoder_only_vae_training_needs_an_earlier_vae(tmp_path):
    import torch

    b = _build_module()
    with pytest.raises(ValueError, match="--vae-init"):
        b.stage_vae(b.Config(vae_decoder_only=1), tmp_path, tmp_path, [], np.zeros((0, 64, 64, 3), np.uint8),
                    torch.device("cpu"))


def _assert_same_function(deeper, earlier):
    """The deeper VAE encodes bit for bit as the earlier one and decodes to 1e-5; returns (x, latents)."""
    import torch

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = earlier.encode(x).latent_dist.mean
        assert torch.equal(deeper.encode(x).latent_dist.mean, latents)
        assert torch.allclose(deeper.decode(latents).sample, earlier.decode(latents).sample, atol=1e-5)
    return x, latents


def test_a_deeper_vae_starts_as_the_earlier_one_and_keeps_its_encoder_while_the_decoder_learns():
    import torch

    b = _build_module()
    torch.manual_seed(0)
    small = dict(vae_channels=(16, 32))
    earlier = b.vae_model(b.Config(**small)).eval()
    deeper = b.vae_model(b.Config(**small, vae_layers=2)).eval()
    new = b.load_deeper(deeper, earlier)
    assert new == ["decoder.up_blocks.0.resnets.2", "decoder.up_blocks.1.resnets.2",
                   "encoder.down_blocks.0.resnets.1", "encoder.down_blocks.1.resnets.1"]
    x, latents = _assert_same_function(deeper, earlier)
    # one decoder-only step: the encoder (new identity blocks included) does not move, the decoder does
    for part in (deeper.encoder, deeper.quant_conv):
        part.requires_grad_(False)
    decoder_before = deeper.decoder.up_blocks[0].resnets[2].conv2.weight.clone()
    optimizer = torch.optim.SGD([p for p in deeper.parameters() if p.requires_grad], lr=0.1)
    deeper.decode(deeper.encode(x).latent_dist.sample()).sample.sub(x).pow(2).mean().backward()
    optimizer.step()
    with torch.no_grad():
        assert torch.equal(deeper.encode(x).latent_dist.mean, latents)
    assert not torch.equal(deeper.decoder.up_blocks[0].resnets[2].conv2.weight, decoder_before)
    # a VAE of other widths is refused with a message, not a size-mismatch trace from torch
    with pytest.raises(ValueError, match="only layers_per_block may differ"):
        b.load_deeper(b.vae_model(b.Config(vae_channels=(16,), vae_layers=2)), earlier)


def test_a_vae_of_two_layers_per_block_grows_to_three_as_the_same_function():
    """Phase 18's step (2 -> 3 layers per block): the third blocks start as identities too."""
    import torch

    b = _build_module()
    torch.manual_seed(1)
    small = dict(vae_channels=(16, 32))
    earlier = b.vae_model(b.Config(**small, vae_layers=2)).eval()
    deeper = b.vae_model(b.Config(**small, vae_layers=3)).eval()
    assert b.load_deeper(deeper, earlier) == [
        "decoder.up_blocks.0.resnets.3", "decoder.up_blocks.1.resnets.3",
        "encoder.down_blocks.0.resnets.2", "encoder.down_blocks.1.resnets.2"]
    _assert_same_function(deeper, earlier)


def test_continuing_a_deeper_vae_without_vae_layers_says_which_to_pass(tmp_path):
    import torch

    b = _build_module()
    deeper = b.vae_model(b.Config(vae_channels=(16, 32), vae_layers=2))
    deeper.save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="pass --vae-layers 2"):
        b.stage_vae(b.Config(vae_channels=(16, 32), vae_decoder_only=1), tmp_path / "out", tmp_path, [],
                    np.zeros((0, 64, 64, 3), np.uint8), torch.device("cpu"), init=tmp_path / "vae")


@pytest.mark.parametrize("layers", [(1, 2), (2, 3), (1, 3)])
def test_a_deeper_unet_starts_as_the_earlier_one_and_its_new_layers_learn(layers):
    """The UNet's growth (load_deeper_unet): the same noise prediction until it trains, every new
    layer in place (the old up layers each still meet the skip they were trained on), and a step of
    training reaches the new layers."""
    import torch

    b = _build_module()
    torch.manual_seed(2)
    small = dict(unet_channels=(32, 64), text_hidden=32)
    earlier = b.unet_model(b.Config(**small, unet_layers=layers[0])).eval()
    deeper = b.unet_model(b.Config(**small, unet_layers=layers[1])).eval()
    new = b.load_deeper_unet(deeper, earlier)
    add = layers[1] - layers[0]
    assert new == sorted(
        [f"down_blocks.0.{kind}.{i}" for kind in ("attentions", "resnets") for i in range(layers[0], layers[1])]
        + [f"down_blocks.1.resnets.{i}" for i in range(layers[0], layers[1])]
        + [f"up_blocks.0.resnets.{i}" for i in range(1, 1 + add)]
        + [f"up_blocks.1.{kind}.{i}" for kind in ("attentions", "resnets") for i in range(1, 1 + add)])
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        before = earlier(x, t, text).sample
        assert before.abs().mean() > 0.05  # the check below compares something
        assert torch.allclose(deeper(x, t, text).sample, before, atol=1e-5)
    deeper.train()
    conv2 = deeper.up_blocks[1].resnets[1].conv2.weight
    assert not conv2.any()
    optimizer = torch.optim.SGD(deeper.parameters(), lr=0.1)
    deeper(x, t, text).sample.pow(2).mean().backward()
    optimizer.step()
    assert conv2.any()
    with pytest.raises(ValueError, match="only layers_per_block may differ"):
        b.load_deeper_unet(b.unet_model(b.Config(unet_channels=(32, 32), text_hidden=32, unet_layers=3)), earlier)


def test_continuing_a_deeper_unet_without_unet_layers_says_which_to_pass(tmp_path):
    import torch

    b = _build_module()
    b.unet_model(b.Config(unet_channels=(32, 64), text_hidden=32, unet_layers=2)).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="pass --unet-layers 2"):  # before any encoding: no CLIP, no VAE needed
        b.stage_unet(b.Config(unet_channels=(32, 64), text_hidden=32), tmp_path / "out", tmp_path, None, None, None,
                     [], np.zeros((0, 64, 64, 3), np.uint8), torch.device("cpu"), init=tmp_path / "unet")


def test_locking_the_text_tower_needs_an_earlier_clip(tmp_path):
    import torch

    b = _build_module()
    with pytest.raises(ValueError, match="--clip-init"):
        b.stage_clip(b.Config(clip_lock_text=1), tmp_path, tmp_path, None, [],
                     np.zeros((0, 64, 64, 3), np.uint8), torch.device("cpu"))


def test_the_command_line_refuses_a_locked_text_tower_before_rendering_anything(tmp_path):
    done = subprocess.run(
        [sys.executable, "scripts/build_mini_sd.py", "--smoke", "--clip-lock-text", "1",
         "--out", str(tmp_path / "models"), "--work", str(tmp_path / "work")],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "give --clip-init FOLDER" in done.stderr
    assert not (tmp_path / "work").exists()  # refused before the work folder, let alone the data
