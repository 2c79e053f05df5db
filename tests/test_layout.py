"""The package's rooms and the direction of their imports (docs/layout.md).

Every import inside ``toolkit`` (module level or in a function) must point from a higher room to
a lower one, or stay in its own room; nothing imports a task; the package never imports the
miniature's factory (``miniature/``) or the tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import compose_cfg, run_entry
from toolkit.config import PACKAGE

# Lower rank = lower room. Rooms of one rank do not import each other.
RANKS = {
    "atomic": 0, "allocator": 0, "logs": 0, "locate": 0, "config": 0, "hashing": 0, "results": 0,
    "reproducibility": 0, "conf": 0, "tracking": 0,
    "data": 1, "metrics": 1, "models": 1, "run": 1,
    "adapters": 2,
    "inference": 3,
    "evaluation": 4, "training": 4,
    "callbacks": 5, "report": 5,
    "tasks": 6, "model_defaults": 6, "plan": 6,
    "cli": 7, "__main__": 8,
}


def room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def imports(path: Path) -> list[tuple[str, int]]:
    """Every toolkit (and miniature/tests) module imported by ``path``, with its line."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
            if node.module == "toolkit":   # from toolkit import x
                out += [(f"toolkit.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return [(m, line) for m, line in out if m.split(".")[0] in ("toolkit", "miniature", "tests")]


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        out.append((".".join(rel.parts).removesuffix(".__init__"), path))
    return out


def test_every_room_has_a_rank():
    rooms = {room(m) for m, _ in modules()} - {"__init__"}
    assert rooms <= set(RANKS), f"rooms without a rank in this test: {sorted(rooms - set(RANKS))}"


def test_imports_point_down():
    bad = []
    for mod, path in modules():
        src = room(mod)
        for target, line in imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            if target.split(".")[0] != "toolkit":
                bad.append(f"{where} (outside the package)")
                continue
            dst = room(target)
            if dst in ("__init__", src):
                continue
            if dst == "tasks":
                bad.append(f"{where} (nothing imports a task)")
            elif RANKS[dst] >= RANKS[src]:
                bad.append(f"{where} ({src}, rank {RANKS[src]}, may not import {dst}, rank {RANKS[dst]})")
    assert not bad, "imports against the layout:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    """The walker sees a function-level import (the kind a cycle hides in)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from toolkit.tasks import train\n    import toolkit.report.table\n")
    assert [m for m, _ in imports(f)] == ["toolkit.tasks", "toolkit.report.table"]


def test_the_module_takes_a_handful_of_arguments():
    """The objective, speed and validation options are objects/blocks of their own (29 arguments before)."""
    import inspect

    from toolkit.training.module import LoRADiffusion

    params = list(inspect.signature(LoRADiffusion.__init__).parameters)[1:]
    assert len(params) <= 13, params
    assert not {"snr_gamma", "noise_offset", "loss", "compile", "val_seed"} & set(params)


@pytest.mark.parametrize(("old", "new"), [
    ("module.snr_gamma=5", "module.objective.snr_gamma=5"),
    ("module.timestep_density.scheme=logit_normal", "module.objective.timesteps.scheme=logit_normal"),
    ("module.min_timestep=100", "module.objective.timesteps.min=100"),
    ("module.loss=huber", "module.objective.loss.kind=huber"),
    ("module.compile=true", "module.speed.compile=true"),
    ("module.val_seed=3", "module.validation.seed=3"),
])
def test_renamed_keys_still_mean_the_same(old, new, tmp_path):
    from omegaconf import OmegaConf

    from toolkit.config import renamed_overrides

    got, notes = renamed_overrides([old, "module.lora.r=8"])
    assert got == [new, "module.lora.r=8"] and len(notes) == 1 and new.split("=")[0] in notes[0]
    a = compose_cfg(["module=lora_miniature", old], tmp_path)   # compose_cfg renames as the entry does
    b = compose_cfg(["module=lora_miniature", new], tmp_path)
    assert OmegaConf.to_container(a.module) == OmegaConf.to_container(b.module)


def test_metric_switches_that_moved_into_metrics_compute_are_refused_saying_where(tmp_path):
    from toolkit.config import renamed_overrides

    with pytest.raises(ValueError, match=r"metrics.prdc is gone: .*metrics.compute"):
        renamed_overrides(["metrics.prdc=false"])
    got, notes = renamed_overrides(["metrics.inception_weights=/w.pt"])
    assert got == ["metrics.features.inception=/w.pt"] and "metrics.features.inception" in notes[0]


def test_an_override_the_task_would_ignore_is_refused():
    from toolkit.config import check_overrides

    msg = check_overrides(["task=report", "report.dir=/tmp", "trainer.devices=8"])
    assert msg and "task=report does not read trainer.devices=8" in msg
    assert check_overrides(["task=report", "report.dir=/tmp"]) is None
    assert check_overrides(["task=sample", "sample.steps=2", "model.name_or_path=x", "generation.steps=3"]) is None
    assert check_overrides(["task=train", "trainer.devices=8"]) is None


def test_one_generation_block_reaches_every_generator(tmp_path):
    cfg = compose_cfg(["module=lora_miniature", "generation.steps=7", "generation.guidance_scale=3",
                       "eval.dataset=x", "metrics.clip_model=y", "eval.num_ref=10"], tmp_path)
    assert (cfg.eval.steps, cfg.callbacks.prior.steps) == (7, 7)
    cb = cfg.callbacks
    assert cfg.eval.guidance_scale == cb.sample_grid.guidance_scale == cb.prior.guidance_scale == 3
    sample = compose_cfg(["task=sample", "generation.steps=7", "sample.guidance_scale=2"], tmp_path)
    assert (sample.sample.steps, sample.sample.guidance_scale) == (7, 2)   # one place, or all


def test_renamed_key_through_the_entry_says_so(tmp_path):
    res = run_entry(["task=report", f"report.dir={tmp_path}", "module.snr_gamma=5"])
    assert "renamed: module.snr_gamma is now module.objective.snr_gamma" in res.stderr
    assert res.returncode != 0 and "task=report does not read module.objective.snr_gamma=5" in res.stderr


def test_a_missing_experiment_is_an_error_not_the_default_job():
    """``experiment=`` names a file: one that is not there (e.g. a miniature experiment given to
    ``run.py`` instead of ``python -m miniature``) stops before any work."""
    res = run_entry(["experiment=pretrain_unet"], timeout=120)
    assert res.returncode != 0 and "experiment/pretrain_unet" in res.stderr
    assert "step" not in res.stderr   # nothing trained


def test_eval_reads_its_dataset_as_the_training_data_unless_told(tmp_path):
    base = ["module=lora_miniature", "eval.dataset=x", "metrics.clip_model=y", "eval.num_ref=10"]
    cfg = compose_cfg([*base, "data.caption_column=caption", "data.split=all"], tmp_path)
    assert (cfg.eval.caption_column, cfg.eval.split, cfg.eval.image_column) == ("caption", "all", "image")
    cfg = compose_cfg([*base, "data.caption_column=caption", "eval.caption_column=text"], tmp_path)
    assert cfg.eval.caption_column == "text"
