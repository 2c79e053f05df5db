"""Feature models by name (CLIP for CMMD, DINOv2, CSD style) and the metrics on them, end to end.

Preprocessing against transformers' processor classes on non-square images; tiny random models of
the real classes saved and loaded through ``from_pretrained`` as a hub id is; formulas against
independent implementations (torchmetrics' FID/KID functions, a direct numpy CMMD); the eval job
with every feature space, held-out prompts, paired Δs and a Pareto summary on two other metrics.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from miniature.world import generate
from tests.conftest import compose_cfg
from toolkit.metrics import features as F
from toolkit.results import read_rows
from toolkit.tasks import eval as eval_task


def odd_images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in ((37, 53), (64, 41), (30, 30), (301, 199), (250, 257))]


def processed(proc, images) -> np.ndarray:
    return np.concatenate([proc(im, return_tensors="np")["pixel_values"] for im in images])


def square_by_slicing(im: Image.Image) -> Image.Image:
    a = np.asarray(im)
    s = min(a.shape[:2])
    t, lft = (a.shape[0] - s) // 2, (a.shape[1] - s) // 2
    return Image.fromarray(a[t: t + s, lft: lft + s])


def test_preprocessing_equals_the_reference_processors_on_non_square_images():
    from transformers import BitImageProcessorPil, CLIPImageProcessorPil

    images = odd_images()
    # CMMD: centre square, then bicubic to the tower's size (the processor resizes, no crop)
    cmmd = CLIPImageProcessorPil(size={"height": 28, "width": 28}, do_center_crop=False)
    ref = processed(cmmd, [square_by_slicing(im) for im in images])
    np.testing.assert_allclose(F.clip_square(images, 28).numpy(), ref, atol=1e-6, rtol=0)
    # DINOv2 (dgm-eval): squash to 224, ImageNet statistics
    dino = BitImageProcessorPil(size={"height": 224, "width": 224}, do_center_crop=False,
                                image_mean=F.IMAGENET_MEAN, image_std=F.IMAGENET_STD)
    np.testing.assert_allclose(F.squash(images).numpy(), processed(dino, images), atol=1e-6, rtol=0)
    # CSD: shortest side 224, centre crop 224 (CLIP's own processor; these sizes round alike in both rules)
    csd = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    np.testing.assert_allclose(F.shortest_then_crop(images, 24).numpy(), processed(csd, images), atol=1e-6, rtol=0)
    # torchvision's CenterCrop offsets: round((side - size) / 2), e.g. 27 -> 24 starts at 2 (not 1)
    a = np.arange(27, dtype=np.uint8)[None, :, None].repeat(30, 0).repeat(3, 2)
    assert np.asarray(F.centre_crop(Image.fromarray(a), 24))[0, 0, 0] == 2


def tiny_vision(root, kind: str) -> str:
    """A tiny random model of the real class, saved as a hub checkpoint is."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    path = root / kind
    if kind == "dinov2":
        model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                         image_size=224, patch_size=28))
    else:
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=48,
                                                               num_hidden_layers=2, num_attention_heads=4,
                                                               image_size=28, patch_size=7, projection_dim=24))
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def vision_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    return {k: tiny_vision(root, k) for k in ("dinov2", "style")}


def test_feature_models_load_by_path_and_compute_what_their_papers_define(vision_models, tiny_clip):
    from transformers import CLIPModel, CLIPVisionModelWithProjection, Dinov2Model

    images = odd_images(1)
    dino = F.FeatureModel("dinov2", vision_models["dinov2"], batch_size=2)
    got = dino(images, progress=False)
    ref = Dinov2Model.from_pretrained(vision_models["dinov2"]).eval()
    with torch.no_grad():
        out = ref(pixel_values=F.squash(images), output_hidden_states=True)
        cls = ref.layernorm(out.hidden_states[-1])[:, 0]    # CLS token after the final LayerNorm
    np.testing.assert_allclose(got, cls.double().numpy(), atol=1e-5)
    assert got.shape == (5, 32) and not np.allclose(np.linalg.norm(got, axis=1), 1)   # not normalised
    assert dino.protocol["preprocess"].startswith("PIL bicubic squash") and len(dino.sha256) == 16

    style = F.FeatureModel("style", vision_models["style"])
    s = style(images, progress=False)
    csd = CLIPVisionModelWithProjection.from_pretrained(vision_models["style"]).eval()
    with torch.no_grad():
        pooled = csd.vision_model(pixel_values=F.shortest_then_crop(images, 28)).pooler_output
        emb = pooled @ csd.visual_projection.weight.T   # the style head on the post-LayerNorm CLS
    np.testing.assert_allclose(s, torch.nn.functional.normalize(emb, dim=-1).double().numpy(), atol=1e-5)

    # CMMD's CLIP from a whole CLIPModel folder (its image tower), equal to the CLIP score's own
    # image embeddings (features.clip=same)
    clip = F.FeatureModel("clip", tiny_clip)
    same = F.FeatureModel("clip", tiny_clip, model=CLIPModel.from_pretrained(tiny_clip).eval())
    from toolkit.metrics.clip import CLIPScorer

    scorer = CLIPScorer(tiny_clip)
    _, emb = scorer.scores_and_embeddings(images, ["a"] * 5, progress=False)
    np.testing.assert_allclose(clip(images, progress=False), emb, atol=1e-6)
    np.testing.assert_allclose(same(images, progress=False), emb, atol=1e-6)
    assert clip.sha256 == same.sha256 and clip.protocol["class"] == "CLIPVisionModelWithProjection"


def test_preference_score_is_pickscores_logit(tiny_clip):
    """PickScore ranks images by CLIPModel's logits_per_image: exp(logit_scale)·cos(image, text)."""
    from transformers import CLIPModel, CLIPTokenizer

    from toolkit.metrics.clip import CLIPScorer

    images, texts = odd_images(2)[:4], ["a red circle", "stripes", "a dog", "a large blue square at night"]
    got = CLIPScorer(tiny_clip, kind="preference").scores(images, texts, progress=False)
    model, tok = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPTokenizer.from_pretrained(tiny_clip)
    pixels = F.clip_square(images, model.config.vision_config.image_size)
    with torch.no_grad():
        out = model(**tok(texts, padding=True, return_tensors="pt"), pixel_values=pixels)
    np.testing.assert_allclose(got, out.logits_per_image.diagonal().double().numpy(), rtol=1e-5, atol=1e-5)
    clip = CLIPScorer(tiny_clip).scores(images, texts, progress=False)   # 100·max(cos, 0) of the same pairs
    cos = got / model.logit_scale.exp().item()
    np.testing.assert_allclose(clip, 100 * np.maximum(cos, 0), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_that_does_not_load_whole_is_refused(vision_models, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    conf = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                            image_size=28, patch_size=7)
    CLIPVisionModel(conf).save_pretrained(tmp_path / "v")
    with pytest.raises(ValueError, match=r"metrics.features.style=.*does not load whole.*1 missing"):
        F.FeatureModel("style", str(tmp_path / "v"))   # no style projection: it would be random
    with pytest.raises(ValueError, match="does not load whole as Dinov2Model"):
        F.FeatureModel("dinov2", vision_models["style"])
    with pytest.raises(FileNotFoundError, match="metrics.features.dinov2"):
        F.FeatureModel("dinov2", str(tmp_path / "absent"))


def test_metric_names_are_parsed_or_refused():
    from toolkit.evaluation.scores import parse_metrics

    got = parse_metrics(["fid", "cmmd", "fd_dinov2", "vendi_clip", "style_similarity", "clip_score"])
    assert [(m.family, m.space) for m in got] == [("fd", "inception"), ("cmmd", "clip"), ("fd", "dinov2"),
                                                  ("vendi", "clip"), ("style_similarity", "style"),
                                                  ("clip_score", None)]
    with pytest.raises(ValueError, match="'fd_inception' is called 'fid'"):
        parse_metrics(["fd_inception"])
    with pytest.raises(ValueError, match="unknown metric 'lpips'"):
        parse_metrics(["lpips"])
    with pytest.raises(ValueError, match="twice"):
        parse_metrics(["fid", "fid"])


def test_fd_and_kd_equal_torchmetrics_on_dinov2_shaped_features():
    """An oracle that stays when SciPy drops sqrtm: torchmetrics' FID (eigvals) and KID (poly MMD) functions."""
    from torchmetrics.image.fid import _compute_fid
    from torchmetrics.image.kid import poly_mmd

    from toolkit.metrics.intervals import Reference, fid_interval, kid_interval

    rng = np.random.default_rng(3)
    mix = rng.standard_normal((1024, 1024)) / 32
    real = rng.standard_normal((300, 1024)) @ mix
    fake = (rng.standard_normal((300, 1024)) + 0.3) @ mix   # torchmetrics' MMD assumes equal set sizes
    ref = Reference.from_features(real)
    fd = fid_interval(ref, fake, groups=5).estimate
    t = lambda x: torch.from_numpy(x)
    oracle = _compute_fid(t(real.mean(0)), t(np.cov(real, rowvar=False)), t(fake.mean(0)),
                          t(np.cov(fake, rowvar=False))).item()
    assert fd == pytest.approx(oracle, rel=1e-6)
    kd = kid_interval(ref, fake, groups=5).estimate   # all pairs at once = poly_mmd on the whole sets
    assert kd == pytest.approx(poly_mmd(t(real), t(fake)).item(), rel=1e-6)


def cmmd_by_hand(x: np.ndarray, y: np.ndarray, sigma: float = 10.0) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    k = lambda a, b: np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * sigma**2))
    return 1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def eval_cfg(model, clip, data, cache, out, extra):
    return compose_cfg(["task=eval", f"model.name_or_path={model}", f"metrics.clip_model={clip}",
                        f"eval.dataset={data}", f"metrics.cache_dir={cache}", "eval.num_images=8", "eval.steps=2",
                        "eval.batch_size=4", "metrics.interval_groups=4", "eval.num_ref=null",
                        "fabric.accelerator=cpu", "logger=none", f"hydra.run.dir={out}", *extra], out)


def test_eval_with_every_feature_space_held_out_prompts_and_paired_deltas(tiny_model, tiny_clip, vision_models,
                                                                         tmp_path):
    from toolkit.evaluation.summary import summarize_rows
    from toolkit.metrics.intervals import Reference, fid_interval
    from toolkit.metrics.style import style_similarity

    data = generate(tmp_path / "data", n=8, seed=5, striped=True, size=32)
    results = tmp_path / "results.jsonl"
    extra = [f"metrics.features.dinov2={vision_models['dinov2']}", f"metrics.features.style={vision_models['style']}",
             "metrics.compute=[fid,cmmd,fd_dinov2,kd_dinov2,vendi_dinov2,style_similarity,clip_score,preference]",
             f"metrics.preference_model={tiny_clip}",
             "eval.held_out_prompts=[a castle at night,a bowl of fruit]", "eval.num_held_out=4",
             f"eval.results_file={results}"]
    rows = []
    for name, guidance in (("a", 1.0), ("b", 3.0)):
        eval_task.run(eval_cfg(tiny_model, tiny_clip, data, tmp_path / "cache", tmp_path / name,
                               [*extra, f"eval.guidance_scale={guidance}"]))
        rows = read_rows(results)
    assert len(rows) == 2
    row, m = rows[0], rows[0]["metrics"]
    for k in ("fid", "cmmd", "fd_dinov2", "kd_dinov2", "vendi_dinov2", "style_similarity", "clip_score",
              "preference", "clip_score_held_out", "style_similarity_held_out", "preference_held_out"):
        assert m[f"{k}_ci_low"] <= m[k] <= m[f"{k}_ci_high"], k
    assert m["n_fake"] == 8 and "kid" not in m and "precision" not in m   # only what was asked
    assert set(row["settings"]["features"]) == {"clip", "dinov2", "style"}
    assert row["protocol"]["features"]["dinov2"]["preprocess"].startswith("PIL bicubic squash")
    assert row["protocol"]["images"] == {"in_distribution": 8, "held_out": 4}
    groups = row["per_prompt"]["group"]
    assert groups["held-out"]["n"] == 4 and groups["in-distribution"]["n"] == 8
    assert {"castle", "fruit"} <= {w for p in row["per_prompt"]["prompt"] for w in p.split()}

    # the row's numbers from its stored features, by independent formulas; set metrics on the
    # in-distribution images only
    with np.load(row["files"]["per_image"]) as z:
        per = {k: z[k] for k in z.files}
    assert per["features_dinov2"].shape == (12, 32) and len(per["seeds"]) == 12
    real_d = np.load(row["files"]["reference_features_dinov2"])
    assert m["fd_dinov2"] == pytest.approx(fid_interval(Reference.from_features(real_d),
                                                        per["features_dinov2"][:8].astype(np.float64), 4).estimate)
    real_c = np.load(row["files"]["reference_features_clip"])
    assert m["cmmd"] == pytest.approx(cmmd_by_hand(real_c, per["features_clip"][:8].astype(np.float64)), rel=1e-5)
    real_s = np.load(row["files"]["reference_features_style"])
    assert m["style_similarity"] == pytest.approx(style_similarity(per["features_style"][:8], real_s), rel=1e-5)
    assert m["clip_score_held_out"] == pytest.approx(per["clip"][8:].mean())
    assert m["preference"] == pytest.approx(per["preference"][:8].mean())

    # paired Δ per metric; a summary whose Pareto front is style similarity vs CLIP score
    varying, table = summarize_rows(rows, baseline="guidance_scale=1.0", pareto=("style_similarity", "clip_score"))
    tuned = next(e for e in table if not e["baseline"])
    for k in ("fid", "cmmd", "fd_dinov2", "vendi_dinov2", "style_similarity", "clip_score", "clip_score_held_out",
              "preference"):
        assert tuned[f"delta_{k}_ci_low"] <= tuned[f"delta_{k}"] <= tuned[f"delta_{k}_ci_high"], k
        assert tuned[f"delta_{k}"] == pytest.approx(rows[1]["metrics"][k] - rows[0]["metrics"][k], rel=1e-6, abs=1e-9)
    assert tuned["delta_method"] == "paired jackknife over images" and "delta_precision" not in tuned
    assert all(e["pareto_axes"] == ["style_similarity", "clip_score"] for e in table)
    json.dumps(table)   # the summary files are JSON
    with pytest.raises(ValueError, match=r"pareto=\['lpips', 'fid'\]: expected two of the rows' metrics"):
        summarize_rows(rows, pareto=("lpips", "fid"))


def test_a_metric_on_a_feature_model_not_named_fails_saying_which_key(tiny_model, tiny_clip, tmp_path):
    data = generate(tmp_path / "data", n=4, seed=5, size=32)
    cfg = eval_cfg(tiny_model, tiny_clip, data, tmp_path / "cache", tmp_path / "o", ["metrics.compute=[fid,fd_dinov2]"])
    with pytest.raises(ValueError, match=r"\['fd_dinov2'\].*metrics.features.dinov2, which is null"):
        eval_task.run(cfg)
