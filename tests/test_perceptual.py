"""LPIPS and the within-prompt diversity it scores (``toolkit.metrics.perceptual``): the distances
against the ``lpips`` package itself (installed for the test beside the environment with the
torchvision release paired with torch 2.13, ``tests/oracles.py``), the diversity's per-image
form and intervals against direct computations, its coverage by simulation, the files it refuses,
and the eval job end to end (per prompt, held-out prompts, paired Δ, two processes = one).

Coverage as last measured (95 %, Student t over prompts; P prompts of k images, each prompt with
its own spread, so D_p varies from prompt to prompt):

    P=30 k=4, spread ~ U(0.5, 1.5)   94.1 % of E[D] over 1000 trials
    paired Δ under the null, P=30 k=4: 96.2 % over 1000 trials
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from miniature.world import generate
from tests.conftest import compose_cfg, run_entry, run_oracle
from tests.test_feature_models import eval_cfg
from toolkit.evaluation.job import lpips_plan, prompt_ids
from toolkit.metrics import perceptual as P
from toolkit.results import read_rows
from toolkit.tasks import eval as eval_task


def pictures(seed: int = 0, n: int = 5, h: int = 40, w: int = 56) -> np.ndarray:
    """Non-square uint8 images around one picture (what a prompt's seeds give), two of them equal."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, h, w, 3))
    ims = np.clip(base + rng.normal(0, 40, (n, h, w, 3)), 0, 255).astype(np.uint8)
    ims[3] = ims[2]
    return ims


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_the_lpips_package(net, oracles, tmp_path):
    ims = pictures()
    np.save(tmp_path / "ims.npy", ims)
    trunk, out = tmp_path / f"{net}-trunk.pth", tmp_path / "d.npy"
    run_oracle(oracles, "lpips", net, trunk, tmp_path / "ims.npy", out)
    oracle = np.load(out)
    heads = oracles / "lpips" / "weights" / "v0.1" / f"{net}.pth"
    model, protocol = P.load(net, trunk, heads)   # torchvision's file as saved, classifier.* included
    d = P.pairwise(model, list(ims), batch_size=2)
    assert oracle[0, 1] > 1e-3 and oracle[2, 3] == 0
    np.testing.assert_allclose(d, oracle, rtol=1e-5, atol=1e-9)
    x = P.to_input(ims)
    np.testing.assert_allclose(model(x[:4], x[1:]).numpy(), np.diag(oracle, 1), rtol=1e-5, atol=1e-9)
    assert protocol["net"] == net and len(protocol["heads_sha256"]) == 64

    # heads null: the installed package's, found without importing it (its import needs torchvision)
    sys.path.insert(0, str(oracles))
    try:
        assert P.package_heads(net) == heads and "lpips" not in sys.modules
    finally:
        sys.path.remove(str(oracles))


def random_files(folder: Path, net: str = "alex", seed: int = 0) -> tuple[Path, Path]:
    """A random trunk in torchvision's state-dict format and random positive heads, as lpips'."""
    torch.manual_seed(seed)
    m = P.LPIPS(net)
    trunk = {f"features.{k}": v for k, v in m.features.state_dict().items()} | {"classifier.1.weight": torch.ones(2)}
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(m.channels)}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(trunk, folder / "trunk.pth")
    torch.save(heads, folder / "heads.pth")
    return folder / "trunk.pth", folder / "heads.pth"


def test_files_that_cannot_be_lpips_weights_are_refused(tmp_path):
    trunk, heads = random_files(tmp_path)
    with pytest.raises(ValueError, match=r"metrics.lpips.backbone to torchvision's alex weights file "
                                         r"alexnet-owt-7be5be79.pth"):
        P.load("alex", None, heads)
    named = tmp_path / "alexnet-owt-7be5be79.pth"   # torchvision's name, another file's content
    named.write_bytes(trunk.read_bytes())
    with pytest.raises(ValueError, match="is named for sha256 7be5be79… but its sha256 is"):
        P.load("alex", named, heads)
    vgg_trunk, vgg_heads = random_files(tmp_path / "vgg", "vgg")
    with pytest.raises(ValueError, match="is not torchvision's alex state dict"):
        P.load("alex", vgg_trunk, heads)
    with pytest.raises(ValueError, match="is not lpips v0.1's alex heads"):
        P.load("alex", trunk, vgg_heads)
    with pytest.raises(ValueError, match="squeeze is not implemented"):
        P.LPIPS("squeeze")
    with pytest.raises(FileNotFoundError, match="metrics.lpips.heads: .* is not a file"):
        P.load("alex", trunk, tmp_path / "nope.pth")


def test_diversity_is_the_mean_over_prompts_of_the_mean_pair_distance():
    rng = np.random.default_rng(1)
    sizes = [3, 2, 5, 1, 4]
    prompt_index = np.repeat(np.arange(len(sizes)), sizes)
    r = np.full(len(prompt_index), np.nan)
    pair_means = []
    for p, k in enumerate(sizes):
        a = rng.random((k, k))
        d = np.triu(a, 1) + np.triu(a, 1).T
        r[prompt_index == p] = P.per_image(d)
        if k > 1:
            pair_means.append(d[np.triu_indices(k, 1)].mean())
    assert np.isnan(r[prompt_index == 3]).all()   # alone in its prompt: no pair, left out
    iv = P.diversity_interval(r, prompt_index)
    low, high = stats.t.interval(0.95, len(pair_means) - 1, np.mean(pair_means), stats.sem(pair_means))
    assert (iv.estimate, iv.low, iv.high) == pytest.approx((np.mean(pair_means), low, high), rel=1e-12)
    assert iv.method == "Student t over 4 prompts"
    b = r + rng.normal(0, 0.1, len(r))   # NaN where r is: the same prompts scored
    c = P.compare_diversity("lpips_diversity", r, b, prompt_index)
    mb = P.prompt_means(b, prompt_index)
    assert c.delta == pytest.approx(mb.mean() - np.mean(pair_means), rel=1e-12)
    assert c.p_value == pytest.approx(stats.ttest_rel(mb, pair_means).pvalue, rel=1e-9)
    assert not c.lower_is_better   # more diverse is higher
    assert "4 per-prompt differences" in c.method

    # which prompts are scored, counted per part; none in-distribution fails before generating
    ids = prompt_ids(["a", "b", "a", "c", "x", "x", "a"], 4)
    assert ids.tolist() == [0, 1, 0, 2, 3, 3, 4]   # held-out "a" is another prompt than in-distribution "a"
    assert lpips_plan(ids, 4, (32, 32), 31, "alex") == {"in_distribution_prompts_scored": 1,
                                                        "in_distribution_prompts_with_one_image": 2,
                                                        "held_out_prompts_scored": 1,
                                                        "held_out_prompts_with_one_image": 1}
    with pytest.raises(ValueError, match=r"eval.num_images=3 gives each of its 3 prompts one image"):
        lpips_plan(prompt_ids(["a", "b", "c"], 3), 3, (32, 32), 31, "alex")
    # an image side below the trunk's smallest input fails, naming the size and the way out
    assert [P.LPIPS(n).smallest_input() for n in ("alex", "vgg")] == [31, 16]
    with pytest.raises(RuntimeError):   # where the check is needed: inside the trunk, below it
        P.LPIPS("alex").layers(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"net=alex needs images of at least 31 px a side, but the eval generates "
                                         r"32x16: set eval.width and eval.height"):
        lpips_plan(ids, 4, (32, 16), 31, "alex")


def simulated(rng, prompts: int = 30, k: int = 4, d: int = 8, shift: float = 0.0) -> np.ndarray:
    """r of P prompts × k images: each prompt its own spread, distances mean squared differences."""
    spread = rng.uniform(0.5, 1.5, prompts) + shift   # LPIPS is bounded: no heavy tail across prompts
    x = rng.normal(size=(prompts, k, d)) * spread[:, None, None]
    r = []
    for p in range(prompts):
        dist = ((x[p][:, None] - x[p][None]) ** 2).mean(-1)
        r.append(P.per_image(dist))
    return np.concatenate(r)


def test_diversity_interval_covers_the_expected_value():
    prompts, k, trials = 30, 4, 1000
    index = np.repeat(np.arange(prompts), k)
    rng = np.random.default_rng(3)
    target = 2 * (1 / 12 + 1)   # E[D_p] = 2 E[s²]; s ~ U(0.5, 1.5): E[s²] = var + mean²
    hits = [(iv.low <= target <= iv.high) for iv in (P.diversity_interval(simulated(rng), index)
                                                     for _ in range(trials))]
    null = []
    for _ in range(trials):   # paired Δ of two cells whose prompts share half their spread
        base = rng.gamma(2.0, 0.5, prompts)
        a, b = (np.repeat(base + rng.gamma(2.0, 0.25, prompts), k) for _ in range(2))
        c = P.compare_diversity("lpips_diversity", a, b, index)
        null.append(c.low <= 0 <= c.high)
    print(f"LPIPS diversity P={prompts} k={k}: coverage {np.mean(hits):.1%}; paired Δ null {np.mean(null):.1%}")
    assert 0.93 <= np.mean(hits) <= 0.97 and 0.93 <= np.mean(null) <= 0.97


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_eval_scores_lpips_diversity_per_prompt_held_out_and_paired(tiny_model, tiny_clip, tmp_path):
    from toolkit.evaluation.summary import summarize_rows

    trunk, heads = random_files(tmp_path / "lpips")
    data = generate(tmp_path / "data", n=4, seed=5, size=32)
    results = tmp_path / "results.jsonl"
    extra = ["metrics.compute=[fid,lpips_diversity]", f"metrics.lpips.backbone={trunk}", f"metrics.lpips.heads={heads}",
             "eval.prompts=[a red square,a blue circle,a green cross,a dog]", "eval.num_images=7",
             "eval.held_out_prompts=[a castle at night,a bowl of fruit]", "eval.num_held_out=4",
             f"eval.results_file={results}", "eval.save_images=true",
             "eval.width=32", "eval.height=32"]   # AlexNet's smallest input is 31 px; the tiny model's own is 16
    for name, guidance in (("a", 1.0), ("b", 3.0)):
        eval_task.run(eval_cfg(tiny_model, tiny_clip, data, tmp_path / "cache", tmp_path / name,
                               [*extra, f"eval.guidance_scale={guidance}"]))
    rows = read_rows(results)
    row, m = rows[0], rows[0]["metrics"]
    assert row["protocol"]["lpips"]["in_distribution_prompts_with_one_image"] == 1   # "a dog": image 3 only
    assert row["protocol"]["lpips"]["backbone_sha256"] == row["settings"]["lpips"]["backbone_sha256"]

    # from the saved images, pair by pair with the direct form (not the Gram form the job uses)
    model, _ = P.load("alex", trunk, heads)
    members = {"in": [[0, 4], [1, 5], [2, 6]], "held": [[7, 9], [8, 10]]}

    def by_hand(out: Path, part: str) -> list[float]:
        x = P.to_input([pixels(out / "samples" / f"{i:05d}.png") for i in range(11)])
        return [float(model(x[a:a + 1], x[b:b + 1])) for a, b in members[part]]

    for part, key in (("in", "lpips_diversity"), ("held", "lpips_diversity_held_out")):
        d = by_hand(tmp_path / "a", part)
        assert m[key] == pytest.approx(np.mean(d), rel=1e-6) and min(d) > 0
        assert m[f"{key}_ci_low"] < m[key] < m[f"{key}_ci_high"]
    assert row["per_prompt"]["prompt"]["a red square"]["lpips_diversity"] == pytest.approx(by_hand(tmp_path / "a",
                                                                                                   "in")[0], rel=1e-6)
    assert "lpips_diversity" not in row["per_prompt"]["prompt"]["a dog"]
    assert row["per_prompt"]["group"]["held-out"]["lpips_diversity"] == pytest.approx(m["lpips_diversity_held_out"])

    # paired Δ: the paired t over the prompts' differences
    _, table = summarize_rows(rows, baseline="guidance_scale=1.0")
    tuned = next(e for e in table if not e["baseline"])
    da, db = np.array(by_hand(tmp_path / "a", "in")), np.array(by_hand(tmp_path / "b", "in"))
    # each score equals its by-hand value to 1e-6 (above), so their difference to 1e-6 of their sum
    assert tuned["delta_lpips_diversity"] == pytest.approx(np.mean(db - da), abs=1e-6 * (da.mean() + db.mean()))
    half = stats.t.ppf(0.975, 2) * stats.sem(db - da)
    assert tuned["delta_lpips_diversity_ci_high"] == pytest.approx(np.mean(db - da) + half, rel=1e-4)

    # two processes score the prompts split between them: the same numbers as one
    out = tmp_path / "two"
    res = run_entry([*compose_args(tiny_model, tiny_clip, data, tmp_path, out, extra),
                     f"eval.results_file={out / 'results.jsonl'}", "fabric.devices=2", "fabric.strategy=ddp"])
    assert res.returncode == 0, res.stderr[-3000:]
    two = read_rows(out / "results.jsonl")[0]
    assert two["protocol"]["world_size"] == 2
    for key in ("lpips_diversity", "lpips_diversity_held_out"):
        assert two["metrics"][key] == pytest.approx(m[key], rel=1e-4), key   # ≤ 1-level pixel noise (tests/test_eval)


def compose_args(model, clip, data, tmp_path: Path, out: Path, extra: list[str]) -> list[str]:
    """``eval_cfg``'s overrides for run.py, guidance 1.0 as cell a."""
    cfg_args = ["task=eval", f"model.name_or_path={model}", f"metrics.clip_model={clip}", f"eval.dataset={data}",
                f"metrics.cache_dir={tmp_path / 'cache'}", "eval.steps=2", "eval.batch_size=4",
                "metrics.interval_groups=4", "eval.num_ref=null", "fabric.accelerator=cpu", "logger=none",
                f"hydra.run.dir={out}", "eval.guidance_scale=1.0"]
    return [*cfg_args, *(e for e in extra if not e.startswith("eval.results_file"))]


def test_lpips_diversity_without_a_trunk_or_with_small_images_fails_before_generating(tiny_model, tiny_clip, tmp_path):
    data = generate(tmp_path / "data", n=4, seed=5, size=32)
    cfg = compose_cfg(["task=eval", f"model.name_or_path={tiny_model}", f"metrics.clip_model={tiny_clip}",
                       f"eval.dataset={data}", "metrics.compute=[lpips_diversity]", "logger=none",
                       "fabric.accelerator=cpu", f"hydra.run.dir={tmp_path / 'o'}"], tmp_path / "o")
    with pytest.raises(ValueError, match="set metrics.lpips.backbone"):
        eval_task.run(cfg)
    assert not (tmp_path / "o" / "eval_shards").exists()

    # the tiny model generates 16 px, below AlexNet's smallest input: named before generating
    trunk, heads = random_files(tmp_path / "lpips")
    cfg = compose_cfg(["task=eval", f"model.name_or_path={tiny_model}", f"metrics.clip_model={tiny_clip}",
                       f"eval.dataset={data}", "metrics.compute=[lpips_diversity]", "logger=none",
                       f"metrics.lpips.backbone={trunk}", f"metrics.lpips.heads={heads}",
                       "fabric.accelerator=cpu", f"hydra.run.dir={tmp_path / 'p'}"], tmp_path / "p")
    with pytest.raises(ValueError, match="needs images of at least 31 px a side, but the eval generates 16x16"):
        eval_task.run(cfg)
    assert not (tmp_path / "p" / "eval_shards").exists()
