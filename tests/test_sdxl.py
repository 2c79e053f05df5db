"""SDXL as a first-class family, and single-file checkpoints for both families.

The tiny SDXL pipeline (two text encoders, a ``text_time`` UNet) is built by project code and
loaded through the hub path. The SD-1.x training behaviour tests run on it too
(``tests/test_train.py``, ``tests/test_adapters.py``, ``tests/test_encoded_cache.py``); here:
the micro-conditioning is the cut the image was made with (naive and cached), fixed values
override it, exact resume with buckets, half-precision VAE handling, and single files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from tests.conftest import compose_cfg, run_entry, tiny_overrides
from tests.helpers import one_process_trainer
from toolkit.data.transforms import resize_to_cover, to_tensor
from toolkit.models.pretrained import load_components
from toolkit.models.single_file import pipeline_to_single_file
from toolkit.tasks import sample as sample_task


def make_mixed(data: Path) -> Path:
    """Noise images of several aspect ratios and sizes (kohya layout), so buckets and crops vary."""
    data.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate([(80, 40), (40, 80), (48, 48), (66, 54), (100, 60), (36, 60)] * 3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), np.uint8)).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(f"image {i}")
    return data


@pytest.fixture(scope="module")
def mixed_shapes(tmp_path_factory) -> Path:
    return make_mixed(tmp_path_factory.mktemp("mixed"))


def xl_overrides(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_overrides(model, data, out) + ["data.val_fraction=0", "data.global_batch_size=3", "data.resolution=32",
                                               "data.buckets={step:8,max_aspect:2.0}", "data.random_flip=true",
                                               *extra]


def test_micro_conditioning_is_the_cut_the_image_was_made_with(tiny_sdxl, mixed_shapes, tmp_path):
    cfg = compose_cfg(xl_overrides(tiny_sdxl, mixed_shapes, tmp_path), tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    ds = dm.train_set
    assert len(set(ds.sizes)) >= 2
    for epoch in (0, 1):
        for i in range(len(ds)):
            item = ds[(epoch, i)]
            oh, ow, top, left, th, tw = (int(v) for v in item["micro"])
            img = Image.open(ds.raw(ds.indices[i])[0]).convert("RGB")
            assert (ow, oh) == img.size and (tw, th) == ds.target_size(i)
            resized = resize_to_cover(img, (tw, th))
            # the crop's top-left, read in the frame the model sees: unflipped or mirrored
            plain = to_tensor(resized.crop((left, top, left + tw, top + th)))
            mirrored = to_tensor(resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((left, top, left + tw,
                                                                                             top + th)))
            assert torch.equal(item["pixel_values"], plain) or torch.equal(item["pixel_values"], mirrored)


def test_cached_micro_conditioning_equals_the_naive_one(tiny_sdxl, mixed_shapes, tmp_path):
    from toolkit.callbacks.encoded_cache import EncodedCache
    from toolkit.tasks import train

    cache = tmp_path / "cache"
    cfg = compose_cfg(xl_overrides(tiny_sdxl, mixed_shapes, tmp_path / "run", "trainer.max_steps=2",
                                   f"callbacks.encoded_cache.dirpath={cache}", "~callbacks.sample_grid"),
                      tmp_path / "run")
    train.run(cfg)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    naive = {i: [dm.train_set[(e, i)] for e in range(6)] for i in range(len(dm.train_set))}
    module = instantiate(cfg.module)
    trainer = one_process_trainer(dm)
    EncodedCache(str(cache)).on_fit_start(trainer, module)   # reads the run's cache: nothing to encode
    for i, items in naive.items():
        cached = [dm.train_set[(e, i)] for e in range(6)]   # same (seed, epoch, item) flip draws
        assert all(torch.equal(a["micro"], b["micro"]) for a, b in zip(items, cached))
        assert "latent_params" in cached[0]


def test_fixed_micro_conditioning_overrides_each_images_own(tiny_sdxl, tiny_model, imagefolder_data, tmp_path):
    fixed = "module.micro_conditioning={original_size:[1024,1024],crop_top_left:[0,0]}"
    cfg = compose_cfg(tiny_overrides(tiny_sdxl, imagefolder_data, tmp_path) + [fixed], tmp_path)
    module = instantiate(cfg.module)
    batch = {"micro": torch.tensor([[32.0, 40, 3, 5, 16, 16], [20, 20, 1, 2, 16, 16]])}
    assert module.micro(batch).tolist() == [[1024, 1024, 0, 0, 16, 16]] * 2
    with pytest.raises(Exception, match="takes no size/crop conditioning"):
        instantiate(compose_cfg(tiny_overrides(tiny_model, imagefolder_data, tmp_path) + [fixed], tmp_path).module)


def test_an_sdxl_unet_in_a_pipeline_without_its_second_encoder_is_refused(tiny_sdxl, tmp_path):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl, broken)
    index = json.loads((broken / "model_index.json").read_text())
    for name in ("tokenizer_2", "text_encoder_2"):
        index.pop(name)
        shutil.rmtree(broken / name)
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"sdxl model, which needs the pipeline components \['tokenizer_2', "
                                         r"'text_encoder_2'\]"):
        load_components(str(broken))


def test_a_half_precision_vae_that_overflows_stays_float32(tiny_sdxl):
    c = load_components(tiny_sdxl, dtype="float16")   # the tiny SDXL VAE says force_upcast, as SDXL's does
    assert c.denoiser.dtype == torch.float16 and c.vae.dtype == torch.float32
    assert all(e.dtype == torch.float16 for e in c.text_encoders.values())


def test_sigkill_then_resume_with_buckets_is_bit_identical(tiny_sdxl, mixed_shapes, tmp_path):
    from tests.test_fault_tolerance import ADAPTER, same_tensors, start, wait_for

    args = lambda out: xl_overrides(tiny_sdxl, mixed_shapes, out, "trainer.max_steps=8", "trainer.deterministic=true",
                                    "module.objective.caption_dropout=0.3", "callbacks.sample_grid.every_n_steps=100")
    ref = run_entry(args(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = start(args(tmp_path / "run"))
    wait_for(tmp_path / "run" / "checkpoints" / "step=4.ckpt", proc)
    proc.kill()
    proc.wait()
    res = run_entry(args(tmp_path / "run") + ["ckpt_path=last"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert same_tensors(tmp_path / "run" / ADAPTER, tmp_path / "ref" / ADAPTER)


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_sdxl"])
def test_single_file_draws_like_its_folder(request, model_fixture, tmp_path):
    folder = request.getfixturevalue(model_fixture)
    c = load_components(folder)
    parts = {"vae": c.vae, "unet": c.denoiser, **c.tokenizers, **c.text_encoders}
    single = pipeline_to_single_file(c.family.pipeline(parts, c.noise_scheduler), tmp_path / "model.safetensors",
                                     dtype=torch.float32)
    common = ["task=sample", "sample.steps=3", "sample.seeds=[0,1]", "sample.prompts=[a red circle]",
              "sample.height=16", "sample.width=16"]
    outs = {}
    for name, model in (("folder", [f"model.name_or_path={folder}"]),
                        ("file", [f"model.name_or_path={single}", f"model.config={folder}"])):
        out = tmp_path / name
        sample_task.run(compose_cfg(common + model + [f"hydra.run.dir={out}"], out))
        outs[name] = [np.asarray(Image.open(out / "samples" / f"{i:05d}.png"), np.int16) for i in range(2)]
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(outs["folder"], outs["file"]))

    with pytest.raises(ValueError, match="pass model.config"):
        load_components(str(single))
    other = request.getfixturevalue("tiny_sdxl" if model_fixture == "tiny_model" else "tiny_model")
    with pytest.raises(ValueError, match="could not be read with model.config|does not match model.config"):
        load_components(str(single), config=other)
