"""The docs stay true: every documented command composes, the marked ones run, every link exists.

Every ``python run.py …`` / ``toolkit …`` command in the README's and ``docs/``'s shell blocks (and
the README's task table) goes through the entry's own argument handling (``prepare_args``) and is
composed with Hydra, each cell of a ``-m`` line on its own: the config composes, every key exists,
nothing is left ``???``, and the settings that follow the model are chosen — or refused — as the
comment lines under the command say (``chosen …``, ``config error: …``). Placeholders (``<dataset>``,
``<run dir>``, example paths such as ``/shared/my_data``) become fixtures by the key they set; hub
ids become tiny local models of the same family and geometry in a hub cache of the test's own
(``HF_HUB_CACHE``), so they load through the same hub path a real id does, offline. A command
ending in ``# runs: embedded`` is run for real under ``debug=fast`` on the embedded model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from miniature.world import generate
from tests.conftest import ROOT, run_entry
from tests.docs import CODE_PATH, LINK, anchors, documented_commands, expand_braces
from tests.tiny import (
    build_tiny_flux2_klein_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
)

COMMANDS = documented_commands(ROOT)
PLACEHOLDER = re.compile(r"^<[^<>]+>$")

# Hub ids the docs and shipped configs name, and the tiny stand-in each gets: same family, same
# native geometry (UNet sample_size, VAE factor), so what follows the model is chosen as for the real one.
STANDINS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("sd", {"sample_size": 64}),
    "stabilityai/stable-diffusion-2-1": ("sd", {"sample_size": 96, "prediction_type": "v_prediction"}),
    "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", {"sample_size": 128}),
    "stabilityai/stable-diffusion-3.5-medium": ("sd3", {"sample_size": 128}),
    "black-forest-labs/FLUX.1-dev": ("flux", {}),   # 1024 px: the pipeline's default_sample_size x VAE 8
    "black-forest-labs/FLUX.2-klein-base-4B": ("flux2", {}),   # likewise
    "madebyollin/sdxl-vae-fp16-fix": ("vae", {}),
    "openai/clip-vit-large-patch14": ("clip", {}),
    "openai/clip-vit-large-patch14-336": ("clip", {}),
}
HUB_DATASETS = {"lambdalabs/naruto-blip-captions"}   # data.path hub ids: a local captioned folder stands in
MODEL_KEYS = ("model.name_or_path", "model.config", "model.vae")
DATA_KEYS = ("data.path", "data.remote", "eval.dataset")
RUN_KEYS = ("adapter", "report.dir", "module.init_adapter")
FRESH_KEYS = ("sweep", "hydra.sweep.dir", "prepare.output", "data.local")


def split_values(value: str) -> list[str]:
    """A sweep's values (``a,b``), commas inside brackets and quotes kept."""
    out, depth, cur, quote = [], 0, "", None
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(<":
            depth += 1
        elif ch in "]})>":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    return [*out, cur]


def is_hub_id(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value)) and not Path(value).exists()


class Fixtures:
    """What placeholders become, by the key they set."""

    def __init__(self, root: Path, models: dict[str, Path]) -> None:
        self.root, self.models, self.n = root, models, 0

    def fresh(self) -> str:
        self.n += 1
        return str(self.root / "fresh" / str(self.n))

    def value(self, key: str, value: str, args: list[str], cmd: str) -> str:
        placeholder = bool(PLACEHOLDER.match(value)) or value in ("...", "…")
        exists = Path(value).expanduser().exists() or value.startswith("s3://")
        if key in MODEL_KEYS:
            if is_hub_id(value) and not placeholder:
                assert value in STANDINS, (f"{cmd}: hub id {value!r} has no tiny stand-in: add it to STANDINS in "
                                           "tests/test_docs.py")
                return value
            if placeholder:   # <hub id, dir or .safetensors>: the first kind named
                return str(self.models["sd_local"])
            if not exists:   # an example path: a file of that kind
                return str(self.models["single_file" if value.endswith(".safetensors") else "sd_local"])
            return value
        if key in ("metrics.clip_model", "metrics.features.clip") and is_hub_id(value):
            assert value in STANDINS, f"{cmd}: hub id {value!r} has no tiny stand-in: add it to STANDINS"
            return value
        if key in DATA_KEYS:
            if placeholder or not (exists or value in HUB_DATASETS):
                return str(self.models["data400" if "400" in value else "data"])
            return str(self.models["data"]) if value in HUB_DATASETS else value
        if key in RUN_KEYS:
            return value if exists and not placeholder else str(self.models["run"])
        if key == "hydra.run.dir":
            resumes = any(a.startswith("ckpt_path=") for a in args)
            return str(self.models["run"]) if resumes else self.fresh()
        if key in FRESH_KEYS:
            return value if value.startswith("s3://") else self.fresh()
        assert not placeholder, f"{cmd}: no fixture for {key}={value}: add one to Fixtures.value in tests/test_docs.py"
        return value

    def args(self, args: list[str], cmd: str) -> list[str]:
        out = []
        for a in args:
            key, eq, value = a.partition("=")
            if not eq or a.startswith("-"):
                out.append(a)
                continue
            new = [self.value(key.lstrip("+~"), v, args, cmd) for v in split_values(value)]
            out.append(f"{key}={','.join(new)}")
        return out


def hub_cache(root: Path, tmp: Path) -> Path:
    """A hub cache (``models--org--name/snapshots/<commit>/``) holding a tiny stand-in per id."""
    from transformers import CLIPConfig, CLIPModel

    from miniature.tokenizer import load_clip_tokenizer

    built: dict[tuple, Path] = {}
    for hub_id, (kind, kw) in STANDINS.items():
        key = (kind, tuple(sorted(kw.items())))
        if key not in built:
            out = tmp / f"{kind}-{len(built)}"
            if kind == "sd":
                build_tiny_pipeline(out, vae_channels=(8,) * 4, **kw)
            elif kind == "sdxl":
                build_tiny_sdxl_pipeline(out, vae_channels=(8,) * 4, **kw)
            elif kind == "sd3":
                build_tiny_sd3_pipeline(out, vae_channels=(8,) * 4, **kw)
            elif kind == "flux":
                build_tiny_flux_pipeline(out, vae_channels=(8,) * 4, **kw)
            elif kind == "flux2":
                build_tiny_flux2_klein_pipeline(out, vae_channels=(8,) * 4, **kw)
            elif kind == "vae":
                build_tiny_sdxl_pipeline(tmp / "vae-src", vae_channels=(8,) * 4, sample_size=128)
                shutil.copytree(tmp / "vae-src" / "vae", out)
            else:
                tok = load_clip_tokenizer()
                CLIPModel(CLIPConfig(
                    text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77},
                    vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                    projection_dim=16)).save_pretrained(out)
                tok.save_pretrained(out)
            built[key] = out
        repo = root / f"models--{hub_id.replace('/', '--')}"
        commit = "0" * 39 + str(len(list(root.glob("models--*"))) % 10)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        shutil.copytree(built[key], repo / "snapshots" / commit)
    return root


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, tiny_model) -> Fixtures:
    tmp = tmp_path_factory.mktemp("docs")
    hub = hub_cache(tmp / "hub", tmp / "build")
    data = generate(tmp / "data", n=24, seed=0, size=32)   # the embedded preset trains 16 a step; 10 % held out
    data400 = generate(tmp / "data400", n=400, seed=1, size=16)
    single = tmp / "models" / "my_finetune.safetensors"   # composing reads model.config's configs, not this file
    single.parent.mkdir(parents=True)
    single.write_bytes(b"")
    # a finished run on the embedded model (24 images): what <run dir> stands for
    # (resume, sample, inspect, merge, report)
    run = tmp / "run"
    res = run_entry(["task=train", "debug=fast", f"data.path={data}", f"hydra.run.dir={run}"])
    assert res.returncode == 0, res.stderr[-3000:]
    fx = Fixtures(tmp, {"data": data, "data400": data400, "single_file": single, "sd_local": tiny_model,
                        "run": run})
    fx.hub = hub
    return fx


@pytest.fixture(scope="module")
def composed(fixtures, tmp_path_factory) -> dict[str, dict]:
    """Every documented command through ``tests/docs_compose.py``, in one process."""
    cwd = tmp_path_factory.mktemp("docs-cwd")
    (cwd / "prompts.txt").write_text("a red circle\na blue square\n")
    cmds = [{"id": c.id, "args": fixtures.args(c.args, c.id)} for c in COMMANDS]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(fixtures.hub), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "docs_compose.py")], input=json.dumps(cmds),
                         capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def norm(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_composes(cmd, composed):
    got = composed[cmd.id]
    assert "crash" not in got, f"{cmd.id}: `{cmd.text}` does not compose:\n{got['crash']}"
    error = [e for e in cmd.expected if e.startswith("config error:")]
    if error:   # documented as refused: refused, with the documented words
        said = norm(" ".join(cmd.expected[cmd.expected.index(error[0]):]).removeprefix("config error:"))
        said = said.split("...")[0].split("…")[0].strip()
        assert "refused" in got, f"{cmd.id}: `{cmd.text}` is documented as refused, but it composes"
        assert said in norm(got["refused"]), f"{cmd.id}: documented {said!r}, printed {got['refused']!r}"
        return
    assert "refused" not in got, f"{cmd.id}: `{cmd.text}` is refused: {got['refused']}"
    chosen = [line.removeprefix("chosen ") for line in cmd.expected if line.startswith("chosen ")]
    printed = got["cells"][0]["chosen"]
    for line in chosen:
        line = re.split(r"\s{2,}", line)[0]   # doc annotations follow after a gap
        assert any(p.startswith(line) for p in printed), f"{cmd.id}: documented `chosen {line}`, chosen: {printed}"


RUNNABLE = [c for c in COMMANDS if c.runs]


@pytest.mark.parametrize("cmd", RUNNABLE, ids=[c.id for c in RUNNABLE])
def test_marked_command_runs_on_the_embedded_model(cmd, fixtures, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    args = fixtures.args(cmd.args, cmd.id)
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'out'}")
    res = subprocess.run([sys.executable, str(ROOT / "run.py"), *args, "debug=fast"], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd.id}: `{cmd.text}` failed:\n{res.stderr[-3000:]}"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 40 and len(RUNNABLE) >= 3, (len(COMMANDS), len(RUNNABLE))
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_links_and_paths_exist(page):
    text = page.read_text()
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue   # http(s):, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target} -> {dest} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest.read_text()), f"{page.name}: no heading #{anchor} in {dest.name}"
    for ref in CODE_PATH.findall(text):
        for path in expand_braces(ref.rstrip(".,:;")):
            if "<" in path or "*" in path:
                continue
            assert (ROOT / path).exists(), f"{page.name}: `{ref}` names {path}, which does not exist"
