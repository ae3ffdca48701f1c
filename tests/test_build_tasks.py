"""scripts/build_mini_tasks.py: the smoke run builds inpainting and depth-to-image pipelines from
the bundled mini-sd that load with diffusers' own classes, offline, in float32 on the CPU; the
widened UNets start as the text-to-image UNet; and the pipelines' own handling of bad input."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import MINI_SD, ROOT

pytestmark = pytest.mark.skipif(not (MINI_SD / "model_index.json").exists(),
                                reason="the bundled models/mini-sd is missing")


def _build_tasks():
    """The build script as a module (its functions are tested directly)."""
    if "build_mini_tasks" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "build_mini_tasks", ROOT / "scripts" / "build_mini_tasks.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["build_mini_tasks"] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules["build_mini_tasks"]


def _run(out, work):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(
        [sys.executable, "scripts/build_mini_tasks.py", "--smoke", "--out", str(out), "--work", str(work),
         "--no-save"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke build (every stage, then the evaluation), shared by the tests below."""
    root = tmp_path_factory.mktemp("tasks")
    build = _run(root / "models", root / "work")
    assert build.returncode == 0, build.stderr[-3000:]
    return root, build.stdout


@pytest.fixture(scope="module")
def inpaint_pipe(smoke):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(smoke[0] / "models" / "mini-sd-inpainting")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def depth_pipe(smoke):
    from diffusers import StableDiffusionDepth2ImgPipeline

    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(smoke[0] / "models" / "mini-sd-depth")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _scene():
    import random

    from utils.toyworld import render_scene, sample_scene

    return render_scene(sample_scene(random.Random(0), size="large"))


def test_smoke_build_runs_every_stage_and_resumes(smoke):
    root, stdout = smoke
    for line in ("inpainting UNet (EMA weights) saved", "depth estimator saved",
                 "depth UNet (EMA weights) saved", "inpainting.psnr_outside", "inpainting.psnr_outside_oracle",
                 "inpainting.colour_and_shape", "depth.silhouette_iou", "depth.colour",
                 "depth, by the input's shape", "for scale (renders, no model)"):
        assert line in stdout, line
    iou_line = next(line for line in stdout.splitlines() if line.startswith("depth.silhouette_iou "))
    assert "%" not in iou_line and iou_line.split()[2] == "0.8"  # a ratio against its target, not a share
    assert not (root / "models" / "mini-sd-inpainting" / "metrics.json").exists()  # --no-save
    again = _run(root / "models", root / "work")  # every stage done: nothing is trained again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "saved" not in again.stdout


def test_pipelines_load_offline_in_float32_with_fp16_on_disk(smoke, inpaint_pipe, depth_pipe):
    from safetensors import safe_open

    models = smoke[0] / "models"
    assert inpaint_pipe.unet.config.in_channels == 9 and depth_pipe.unet.config.in_channels == 5
    for pipe in (inpaint_pipe, depth_pipe):
        assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    assert depth_pipe.depth_estimator.dtype == torch.float32
    assert type(depth_pipe.depth_estimator).__name__ == "DPTForDepthEstimation"
    assert depth_pipe.feature_extractor.size == {"height": 64, "width": 64}
    for weights in list((models / "mini-sd-inpainting").rglob("*.safetensors")) + list(
            (models / "mini-sd-depth").rglob("*.safetensors")):
        with safe_open(weights, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, weights
    assert not list(models.rglob("*.bin")) and not list(models.rglob("*.pt"))
    # every stage's settings are recorded next to the weights
    recorded = json.loads((models / "mini-sd-depth" / "build_config.json").read_text())
    assert set(recorded) == {"depth_estimator", "depth_unet", "assemble"}
    assert recorded["depth_unet"]["depth_steps"] == _build_tasks().SMOKE["depth_steps"]
    # shared parts are byte-identical copies of mini-sd's (git stores them once)
    for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        for name in ("mini-sd-inpainting", "mini-sd-depth"):
            assert (models / name / part).read_bytes() == (MINI_SD / part).read_bytes()


def test_pipelines_generate_64px_images(inpaint_pipe, depth_pipe):
    from utils.seeding import make_generator

    render = _scene()
    mask = Image.fromarray((render["mask"] >= 0.5).astype(np.uint8) * 255, "L")
    out = inpaint_pipe("a red circle", image=render["image"], mask_image=mask, num_inference_steps=2,
                       generator=make_generator(0)).images[0]
    assert out.size == (64, 64)
    out = depth_pipe("a red circle", image=render["image"], num_inference_steps=2,
                     generator=make_generator(0)).images[0]
    assert out.size == (64, 64)
    # a depth map given instead of the estimator's, (B, H, W) as the pipeline wants
    depth = torch.from_numpy(render["depth"])[None]
    out = depth_pipe("a red circle", image=render["image"], depth_map=depth, num_inference_steps=2,
                     generator=make_generator(0)).images[0]
    assert out.size == (64, 64)


def test_widened_unet_starts_as_the_text_to_image_unet():
    from diffusers import UNet2DConditionModel

    tasks = _build_tasks()
    base = UNet2DConditionModel.from_pretrained(MINI_SD / "unet", torch_dtype=torch.float32).eval()
    wide = tasks.widen_conv_in(base, 9).eval()
    assert wide.config.in_channels == 9 and wide.conv_in.weight[:, 4:].abs().sum() == 0
    gen = torch.Generator().manual_seed(0)
    latents, extra = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 8, 8, generator=gen)
    t, embeds = torch.tensor([10, 900]), torch.randn(2, 77, base.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(wide(torch.cat([latents, extra], 1), t, embeds).sample,
                                   base(latents, t, embeds).sample)


def test_dpt_processor_normalises_as_training_did():
    tasks = _build_tasks()
    image = _scene()["image"]
    pixels = tasks.dpt_processor()(images=image, return_tensors="pt").pixel_values
    expected = torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    torch.testing.assert_close(pixels, expected)  # = to_model_input in the build script


def test_evaluation_metrics_on_known_answers():
    from utils import evaluation

    render = _scene()
    image, coverage = render["image"], render["mask"]
    pixels = np.asarray(image, np.float64)
    inside = coverage >= 0.5
    changed_inside = pixels.copy()
    changed_inside[inside] = 255 - changed_inside[inside]  # only the masked pixels differ
    as_image = lambda a: Image.fromarray(a.astype(np.uint8))  # noqa: E731
    assert evaluation.psnr_outside(image, as_image(changed_inside), coverage) > 100  # nothing kept changed
    shifted = np.clip(pixels + 10, 0, 255)  # every pixel brighter (by 10 where nothing clips)
    keep = ~inside
    expected = 10 * np.log10(255.0**2 / np.mean((shifted[keep] - pixels[keep]) ** 2))
    assert abs(evaluation.psnr_outside(image, as_image(shifted), coverage) - expected) < 1e-9
    assert evaluation.silhouette_iou(coverage, image) > 0.9
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    assert evaluation.silhouette_iou(coverage, blank) == 0.0


def test_silhouette_references_and_breakdown():
    """The scale for the depth IoU: a perfect copy one pixel off loses a fifth or so of IoU, a random
    rotation more, and only shapes that look the same at every angle keep 1.0 when turned."""
    from dataclasses import replace

    from utils import evaluation

    cases = evaluation.depth_cases(12)
    ref = evaluation.silhouette_references(cases)
    assert 0.6 < ref["one_pixel_off"] < 0.95 and 0.4 < ref["random_rotation"] < 1.0
    assert evaluation.silhouette_references(cases) == ref  # seeded
    round_scenes = [replace(c[3], shape="circle") for c in cases]
    circles = [(None, evaluation.render_scene(s)["mask"], None, s) for s in round_scenes]
    assert evaluation.silhouette_references(circles)["random_rotation"] == 1.0
    scenes = [c[3] for c in cases]
    ious = [0.1 * i for i in range(len(cases))]
    seen = [s.shape if i % 2 else None for i, s in enumerate(scenes)]
    rows = evaluation.silhouette_by_shape(ious, seen, scenes)
    assert sum(r["n"] for r in rows.values()) == len(cases)
    for shape, row in rows.items():
        mine = [i for i, s in enumerate(scenes) if s.shape == shape]
        if mine:
            assert row["silhouette_iou"] == pytest.approx(np.mean([ious[i] for i in mine]))
            assert row["shape_right"] == pytest.approx(np.mean([i % 2 == 1 for i in mine]))
            assert row["seen"].get(None, 0) == sum(i % 2 == 0 for i in mine)  # no object found
        else:
            assert row["silhouette_iou"] is None


def test_pipelines_on_bad_input(inpaint_pipe, depth_pipe):
    """diffusers' own behaviour, which the course's helpers make explicit (utils.masks, utils.inputs)."""
    render = _scene()
    image = render["image"]
    mask = Image.fromarray((render["mask"] >= 0.5).astype(np.uint8) * 255, "L")
    kwargs = dict(num_inference_steps=2, output_type="np")
    # strength outside [0, 1]: both pipelines raise
    with pytest.raises(ValueError, match="strength should in \\[0.0, 1.0\\]"):
        inpaint_pipe("a red circle", image=image, mask_image=mask, strength=1.5, **kwargs)
    with pytest.raises(ValueError, match="strength should in \\[0.0, 1.0\\]"):
        depth_pipe("a red circle", image=image, strength=-0.1, **kwargs)
    # height / width not divisible by 8: the inpainting pipeline raises
    with pytest.raises(ValueError, match="divisible by 8"):
        inpaint_pipe("a red circle", image=image, mask_image=mask, height=60, width=60, **kwargs)
    # a mask of another size (or RGB) is silently resized (and turned gray) to the image's size
    out = inpaint_pipe("a red circle", image=image, mask_image=mask.resize((32, 32)).convert("RGB"),
                       **kwargs).images
    assert out.shape == (1, 64, 64, 3)
    # a depth map of the wrong shape fails deep inside F.interpolate
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)):
        depth_pipe("a red circle", image=image, depth_map=torch.from_numpy(render["depth"]), **kwargs)


def test_depth_captions_can_leave_the_layout_to_the_depth_map():
    """captions_for(..., layout_mention=0) never names size or position (the depth map carries the
    layout), still names colours and backgrounds, and drops about caption_dropout of the captions."""
    import random

    from utils.toyworld import POSITIONS, make_scenes

    tasks = _build_tasks()
    cfg = tasks.Config(mention_prob=1.0)
    scenes = make_scenes(400, 5)
    captions = tasks.captions_for(range(400), scenes, random.Random(0), cfg, layout_mention=0.0)
    kept = [c for c in captions if c]
    assert abs(1 - len(kept) / len(captions) - cfg.caption_dropout) < 0.05  # 400 captions: about 3 standard errors
    for caption, scene in zip(captions, scenes):
        if caption:
            assert scene.colour in caption and scene.background in caption, caption
            assert not any(word in caption.split() for word in ("small", "large")), caption
            assert not any(phrase in caption for phrase in POSITIONS), caption
    full = tasks.captions_for(range(400), scenes, random.Random(0), cfg)
    assert sum(any(p in c for p in POSITIONS) for c in full) > 300


def test_conv_in_gets_its_own_learning_rate(tmp_path):
    """The widened conv_in (the new, zero-initialised channels) trains at conv_in_lr_mult times the
    rest's learning rate."""
    from diffusers import UNet2DConditionModel

    tasks = _build_tasks()
    unet = tasks.widen_conv_in(UNet2DConditionModel.from_pretrained(MINI_SD / "unet"), 5)
    cfg = tasks.Config(conv_in_lr_mult=5.0, unet_lr=1e-3)
    trainer, _, _ = tasks.unet_trainer("t", cfg, unet, 10, tmp_path, torch.device("cpu"))
    trainer.total = 1
    trainer.run(lambda step: sum(p.sum() for p in unet.parameters()) * 0.0)
    rest, conv_in = trainer.opt.param_groups
    assert [id(p) for p in conv_in["params"]] == [id(unet.conv_in.weight), id(unet.conv_in.bias)]
    assert conv_in["lr"] == pytest.approx(5 * rest["lr"]) and rest["lr"] > 0


def test_balanced_l1_weighs_a_small_object_like_the_background():
    """An estimator that misses a small object (6% of the pixels) by 0.8 loses only 0.048 on a plain
    L1 but 0.4 on the balanced one, and a perfect one loses 0."""
    tasks = _build_tasks()
    true = torch.zeros(2, 10, 10)
    on_object = torch.zeros(2, 10, 10, dtype=torch.bool)
    on_object[:, :2, :3] = True  # 6 of 100 pixels
    true[on_object] = 0.8
    ramp_only = torch.zeros_like(true)
    assert torch.nn.functional.l1_loss(ramp_only, true).item() == pytest.approx(0.048)
    assert tasks.balanced_l1(ramp_only, true, on_object).item() == pytest.approx(0.4)
    assert tasks.balanced_l1(true, true, on_object).item() == 0.0


def test_cubic_timesteps_favour_high_noise():
    tasks = _build_tasks()
    gen = torch.Generator().manual_seed(0)
    cubic = tasks.sample_timesteps(20_000, gen, "cpu", "cubic")
    uniform = tasks.sample_timesteps(20_000, gen, "cpu", "uniform")
    assert 0 <= cubic.min() and cubic.max() <= 999 and cubic.dtype == torch.long
    assert 850 < cubic.float().median() < 900  # t = 1000 (1 - u^3): median 875
    assert 450 < uniform.float().median() < 550
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        tasks.sample_timesteps(2, gen, "cpu", "logit-normal")


def test_transfer_task_moves_the_fine_tuning_onto_a_new_base():
    from diffusers import UNet2DConditionModel

    tasks = _build_tasks()

    def tiny(seed, channels=(8, 16)):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=channels, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
            norm_num_groups=4, attention_head_dim=2).eval()

    old_base, new_base = tiny(0), tiny(1)
    task = tasks.widen_conv_in(old_base, 9)  # "fine-tuned" from old_base: every weight moved a little
    with torch.no_grad():
        for p in task.parameters():
            p.add_(0.01 * torch.randn_like(p))
    moved = tasks.transfer_task(new_base, task, old_base)
    assert moved.config.in_channels == 9
    got, old, new, tuned = (m.state_dict() for m in (moved, old_base, new_base, task))
    for key in new:
        if key == "conv_in.weight":
            torch.testing.assert_close(got[key][:, :4], new[key] + tuned[key][:, :4] - old[key])
            torch.testing.assert_close(got[key][:, 4:], tuned[key][:, 4:])  # mask channels as trained
        else:
            torch.testing.assert_close(got[key], new[key] + tuned[key] - old[key])
    # onto its own base, the task UNet comes back unchanged
    for key, value in tasks.transfer_task(old_base, task, old_base).state_dict().items():
        torch.testing.assert_close(value, tuned[key])
    with pytest.raises(ValueError, match="architecture"):  # a new base of another width
        tasks.transfer_task(tiny(2, channels=(8, 24)), task, old_base)
    with pytest.raises(ValueError, match="architecture"):  # a task UNet of another width
        tasks.transfer_task(new_base, tasks.widen_conv_in(tiny(3, channels=(8, 24)), 9), old_base)
