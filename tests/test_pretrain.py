"""Pretraining of the embedded miniature: world generator, pure pieces, each task end to end on
tiny settings (into tmp dirs), and the shipped data/miniature models."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from miniature import SEARCHPATH
from miniature.pretrain.clip import contrastive_loss
from miniature.pretrain.imagery import pattern_bank
from miniature.pretrain.latent_cache import LatentTextCache
from miniature.pretrain.world_data import read_rows, scene_of, swapped_caption
from miniature.world import COLOURS, SHAPES, SPLITS, generate
from tests.conftest import compose_cfg
from toolkit.config import ROOT

MINIATURE = ROOT / "data" / "miniature"


def test_world_is_deterministic_and_captions_match_attributes(tmp_path):
    a = generate(tmp_path / "a", n=6, seed=5, size=32)
    b = generate(tmp_path / "b", n=6, seed=5, size=32)
    s = generate(tmp_path / "s", n=6, seed=5, striped=True, size=32)
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for row, srow in zip(read_rows(a), read_rows(s), strict=True):
        assert scene_of(row).caption() == row["text"]
        words = f" {row['text']} "
        for attr in ("shape", "colour", "size", "background"):
            assert f" {row[attr]} " in words
        assert not row["striped"] and "striped" not in row["text"]
        assert srow["striped"] and f"on a striped {srow['background']} background" in srow["text"]


def test_swapped_caption_changes_one_attribute():
    row = read_rows(ROOT / "data" / "world" / "style" / "test", 1)[0]
    rng = np.random.default_rng(0)
    for attr, values in (("colour", COLOURS), ("shape", SHAPES)):
        new = swapped_caption(row, attr, rng)
        changed = [w for w, v in zip(row["text"].split(), new.split(), strict=True) if w != v]
        assert len(changed) == 1 and changed[0] == row[attr] and new != row["text"]
        assert any(f" {v} " in f" {new} " for v in values if v != row[attr])


def test_pattern_bank_is_deterministic_and_varied():
    a, b = pattern_bank(24, seed=3), pattern_bank(24, seed=3)
    assert a.shape == (24, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert len({x.tobytes() for x in a}) == 24 and a.std() > 30


def test_contrastive_loss_prefers_matched_pairs():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(np.log(20.0))
    matched = contrastive_loss(img, img, None, scale)
    assert matched < contrastive_loss(img, img.roll(1, 0), None, scale)
    # a hard negative equal to the positive can only raise the image->text loss
    assert contrastive_loss(img, img, img, scale) > matched


def test_latent_cache_gathers_prompts_by_index():
    cache = LatentTextCache(torch.arange(3.0).view(3, 1, 1, 1), torch.ones(3, 1, 1, 1),
                            torch.tensor([1, 0, 1]), torch.tensor([[[10.0]], [[20.0]]]),
                            torch.zeros(1, 1, 1))
    batch = cache.collate([2, 1])
    assert batch["latent_mean"].flatten().tolist() == [2.0, 1.0]
    assert batch["encoder_hidden_states"].flatten().tolist() == [20.0, 10.0]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    return {"base": generate(root / "base", n=16, seed=0, size=32),
            "style": generate(root / "style", n=8, seed=1, striped=True, size=32)}


def _run_task(experiment: str, overrides: list[str], out: Path) -> dict:
    common = ["trainer.max_steps=2", "trainer.enable_progress_bar=false",
              "trainer.log_every_n_steps=1", f"hydra.run.dir={out}"]
    cfg = compose_cfg([SEARCHPATH, f"experiment={experiment}", *common, *overrides], out)
    return importlib.import_module(cfg.task_module).run(cfg)


def test_pretrain_tasks_end_to_end(tiny_world, tmp_path):
    """Autoencoder, then CLIP, then UNet + pipeline assembly, each through its real config."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from hydra.utils import instantiate

    mini = tmp_path / "miniature"
    base, style = tiny_world["base"], tiny_world["style"]
    ae = _run_task("pretrain_autoencoder", [
        f"pretrain.miniature_dir={mini}", f"pretrain.data.world={base}", "pretrain.data.world_limit=8",
        "pretrain.data.patterns=8", "pretrain.data.batch_size=8", "pretrain.scaling_images=16",
        f"pretrain.eval.base={base}", f"pretrain.eval.style={style}", "pretrain.eval_images=4",
    ], tmp_path / "ae")
    assert ae["global_step"] == 2 and {"mse_base", "mse_style"} <= ae.keys()
    vae_cfg = json.loads((mini / "sd" / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(ae["scaling_factor"])
    # second stage: continues from the first stage's weights, on other texture kinds
    cfg = compose_cfg([SEARCHPATH, "experiment=pretrain_autoencoder_refine", f"pretrain.miniature_dir={mini}"])
    module = instantiate(cfg.pretrain.module)
    saved = AutoencoderKL.from_pretrained(mini / "sd" / "vae").state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in module.vae.state_dict().items())
    refine = _run_task("pretrain_autoencoder_refine", [
        f"pretrain.miniature_dir={mini}", f"pretrain.data.world={base}", "pretrain.data.world_limit=8",
        "pretrain.data.patterns=8", "pretrain.data.batch_size=8", "pretrain.scaling_images=16",
        f"pretrain.eval.base={base}", f"pretrain.eval.style={style}", "pretrain.eval_images=4",
    ], tmp_path / "ae_refine")
    assert refine["global_step"] == 2
    vae_cfg = json.loads((mini / "sd" / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(refine["scaling_factor"])

    clip = _run_task("pretrain_clip", [
        f"pretrain.miniature_dir={mini}", f"pretrain.data.folders=[{{path:{base},limit:16}}]",
        "pretrain.data.batch_size=8", f"pretrain.eval.folder={base}", "pretrain.eval.images=8",
    ], tmp_path / "clip")
    assert clip["global_step"] == 2 and 0 <= clip["binding_colour"] <= 1

    unet = _run_task("pretrain_unet", [
        f"pretrain.miniature_dir={mini}", f"pretrain.data.world={base}", "pretrain.data.batch_size=8",
    ], tmp_path / "unet")
    assert unet["global_step"] == 2 and np.isfinite(unet["train/loss"])
    pipe = StableDiffusionPipeline.from_pretrained(mini / "sd")
    assert pipe.vae.config.scaling_factor == pytest.approx(refine["scaling_factor"])
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


needs_miniature = pytest.mark.skipif(not (MINIATURE / "sd" / "model_index.json").is_file(),
                                     reason="data/miniature not built")


@needs_miniature
def test_shipped_pipeline_loads_float32_and_samples_32px():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MINIATURE / "sd")
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert part.dtype == torch.float32
    out = pipe(["a large red circle in the center on a black background"] * 2, num_inference_steps=4,
               guidance_scale=4.0, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()


@needs_miniature
def test_shipped_clip_binds_colour_and_shape(tmp_path):
    """On held-out base images (the base/test split, regenerated), the true caption beats the
    same caption with the colour / the shape changed far more often than chance (0.5)."""
    from transformers import CLIPModel

    from miniature.pretrain.clip import normalise
    from miniature.pretrain.measure import attribute_binding
    from miniature.pretrain.world_data import load_images
    from miniature.tokenizer import load_clip_tokenizer

    n, seed, striped = SPLITS["base/test"]
    folder = generate(tmp_path / "base_test", n=100, seed=seed, striped=striped)
    model = CLIPModel.from_pretrained(MINIATURE / "clip").eval()
    rows = read_rows(folder)
    pixels = normalise(load_images(folder, rows, model.config.vision_config.image_size))
    rates = attribute_binding(model, load_clip_tokenizer(MINIATURE / "clip"), pixels, rows)
    assert rates["colour"] > 0.75 and rates["shape"] > 0.75, rates
