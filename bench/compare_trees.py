"""SD/SDXL outputs of two code trees, compared bit for bit: the check that a refactor of the family
piece (issue 46; the next family's issue too) leaves the UNet families unchanged.

    git archive <commit before> | tar -x -C /tmp/before-tree
    python bench/compare_trees.py /tmp/before-tree before      # every scenario with that tree's run.py
    python bench/compare_trees.py . after                      # ... and with this one
    python bench/compare_trees.py --compare before after       # tensor by tensor, pixel by pixel

Scenarios, through the real entry point on tiny SD, SD-v and SDXL pipelines (built once by the first
tree, under $COMPARE_DIR, default /tmp/compare-trees): training with the caches (SD, SDXL), naive with
min-SNR, noise offset, input perturbation, caption dropout, logit-normal timesteps and Huber (SD),
zero terminal SNR, debiased estimation and mode timesteps (SD-v), text-encoder LoRA (SDXL), LoKr
(SD); 2-step runs resumed to 4 by each tree, and the "before" tree's 2-step runs resumed by the
"after" tree; task=sample, task=merge (float32 single file) and task=inspect on the results. Compared:
every tensor of every adapter file, checkpoint state dict and merged model, every image, the metrics
CSVs, inspect.json (paths and times aside), the encoded-cache folder names (their keys), and the
old runs' resumes against the old tree's own. Each tree uses its own cache.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

BASE = Path(os.environ.get("COMPARE_DIR", "/tmp/compare-trees"))
MODELS, DATA = BASE / "models", BASE / "data"


def env(root: Path, cache: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "WANDB_MODE": "offline", "TOOLKIT_CACHE": str(cache)}


def tiny(model, data, out):
    return ["task=train", f"model.name_or_path={model}", f"data.path={data}", "data.resolution=16",
            "module=lora_miniature", "data.global_batch_size=4", "data.val_fraction=0.25", "logger=csv",
            "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=2",
            "trainer.enable_progress_bar=false", "callbacks.sample_grid.steps=2",
            "callbacks.sample_grid.every_n_steps=2", f"hydra.run.dir={out}"]


def run(root, args, cache):
    res = subprocess.run([sys.executable, str(root / "run.py"), *args], cwd=root, env=env(root, cache),
                         capture_output=True, text=True, timeout=1200)
    if res.returncode:
        print(res.stderr[-4000:])
        raise SystemExit(f"failed: {args}")
    return res


def build(root):
    if (MODELS / "done").exists():
        return
    code = (f"import sys; sys.path.insert(0, {str(root)!r})\n"
            "from tests.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline\n"
            "from miniature.world import generate\n"
            f"build_tiny_pipeline({str(MODELS / 'sd')!r}, seed=0)\n"
            f"build_tiny_pipeline({str(MODELS / 'sdv')!r}, seed=1, prediction_type='v_prediction')\n"
            f"build_tiny_sdxl_pipeline({str(MODELS / 'sdxl')!r}, seed=0)\n"
            f"generate({str(DATA)!r}, n=16, seed=0, size=32)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env(root, BASE / "cache-build"))
    (MODELS / "done").write_text("")


def record(root: Path, tag: str):
    build(root)
    out = BASE / tag
    out.mkdir(exist_ok=True)
    cache = out / "cache"
    sd, sdv, xl = MODELS / "sd", MODELS / "sdv", MODELS / "sdxl"
    opts = ["callbacks.encoded_cache.latents=false", "callbacks.encoded_cache.text=false",
            "module.objective.snr_gamma=5", "module.objective.noise_offset=0.05",
            "module.objective.input_perturbation=0.1", "module.objective.caption_dropout=0.3",
            "module.objective.timesteps.scheme=logit_normal", "module.objective.loss.kind=huber"]
    runs = {
        "sd": tiny(sd, DATA, out / "sd"),
        "sdxl": tiny(xl, DATA, out / "sdxl"),
        "sd_opts": tiny(sd, DATA, out / "sd_opts") + opts,
        "sdv_opts": tiny(sdv, DATA, out / "sdv_opts") + ["module.objective.zero_terminal_snr=true",
                                                          "module.objective.debiased_estimation=true",
                                                          "module.objective.timesteps.scheme=mode"],
        "sdxl_full": tiny(xl, DATA, out / "sdxl_full") + ["module=lora_full"],
        "sd_lokr": tiny(sd, DATA, out / "sd_lokr") + ["module=lokr"],
        "sd_half": tiny(sd, DATA, out / "sd_half") + ["trainer.max_steps=2"],
        "sdxl_half": tiny(xl, DATA, out / "sdxl_half") + ["trainer.max_steps=2"],
    }
    for name, args in runs.items():
        if not (out / name / "adapter").exists():
            print("train", name, flush=True)
            run(root, args, cache)
    # resume the half runs (the tree's own resume, from this tree's half run)
    for name in ("sd_half", "sdxl_half"):
        dst = out / f"{name}_resumed_own"
        if not dst.exists():
            shutil.copytree(out / name, dst)
            run(root, [f"hydra.run.dir={dst}", "ckpt_path=last", "trainer.max_steps=4"], cache)
    # resume the BEFORE tree's half runs with this tree (old runs resume and match)
    if tag != "before":
        for name in ("sd_half", "sdxl_half"):
            dst = out / f"{name}_resumed_from_before"
            if not dst.exists():
                shutil.copytree(BASE / "before" / name, dst)
                run(root, [f"hydra.run.dir={dst}", "ckpt_path=last", "trainer.max_steps=4"], cache)
    for name, model in (("sd", sd), ("sdxl", xl), ("sdxl_full", xl)):
        dst = out / f"sample_{name}"
        if not dst.exists():
            run(root, ["task=sample", f"model.name_or_path={model}", f"adapter={out / name}", "sample.steps=3",
                       "sample.seeds=[0,1]", "sample.prompts=[a red circle]", "sample.height=16",
                       "sample.width=16", f"hydra.run.dir={dst}"], cache)
    for name, model in (("sd", sd), ("sdxl_full", xl)):
        dst = out / f"merge_{name}"
        if not dst.exists():
            run(root, ["task=merge", f"model.name_or_path={model}", f"adapter={out / name}",
                       "merge.dtype=float32", f"hydra.run.dir={dst}"], cache)
        dst = out / f"inspect_{name}"
        if not dst.exists():
            run(root, ["task=inspect", f"model.name_or_path={model}", f"adapter={out / name}",
                       f"hydra.run.dir={dst}"], cache)
    (out / "cache_dirs.json").write_text(json.dumps(sorted(p.name for p in (cache / "encoded").iterdir())))


def tensors(path: Path):
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(path)
    ck = torch.load(path, weights_only=False, map_location="cpu")
    return ck["state_dict"]


def compare(a: str, b: str):
    import numpy as np
    import torch
    from PIL import Image

    ra, rb = BASE / a, BASE / b
    bad, n_t, n_f, n_img = [], 0, 0, 0
    pairs = [(p, rb / p.relative_to(ra)) for p in sorted(ra.rglob("*"))
             if p.is_file() and "cache" not in p.parts and "wandb" not in p.parts]
    for pa, pb in pairs:
        rel = pa.relative_to(ra)
        if pa.suffix in (".safetensors", ".ckpt"):
            if not pb.exists():
                bad.append(f"missing {rel}")
                continue
            ta, tb = tensors(pa), tensors(pb)
            if ta.keys() != tb.keys():
                bad.append(f"keys differ {rel}: {sorted(set(ta) ^ set(tb))[:4]}")
                continue
            for k in ta:
                n_t += 1
                if not torch.equal(ta[k], tb[k]):
                    bad.append(f"tensor differs {rel}:{k}")
            n_f += 1
        elif pa.suffix == ".png":
            if not pb.exists():
                bad.append(f"missing {rel}")
                continue
            n_img += 1
            if not np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb))):
                bad.append(f"image differs {rel}")
        elif pa.name == "metrics.csv":
            la, lb = pa.read_text().splitlines(), pb.read_text().splitlines()
            hdr = la[0].split(",")
            keep = [i for i, h in enumerate(hdr) if "time" not in h and "throughput" not in h and "per_sec" not in h]
            if [[r.split(",")[i] for i in keep] for r in la] != [[r.split(",")[i] for i in keep] for r in lb]:
                bad.append(f"metrics differ {rel}")
            n_f += 1
        elif pa.name == "inspect.json":
            ja, jb = json.loads(pa.read_text()), json.loads(pb.read_text())
            for x in (ja, jb):
                for f in x:
                    f.pop("file", None)
                    f["metadata"] = {k: v for k, v in f["metadata"].items() if "time" not in k and "finished" not in k
                                     and k != "ss_sd_model_name"}
            if ja != jb:
                bad.append(f"inspect differs {rel}")
            n_f += 1
    ca, cb = (json.loads((r / "cache_dirs.json").read_text()) for r in (ra, rb))
    if ca != cb:
        bad.append(f"cache dirs differ: {ca} vs {cb}")
    print(f"compared {n_f} files ({n_t} tensors), {n_img} images; cache folders {len(ca)} equal={ca == cb}")
    for name in ("sd_half", "sdxl_half"):
        for k, (x, y) in {"own": (f"{name}_resumed_own", f"{name}_resumed_from_before")}.items():
            fa = rb / x / "adapter" / "pytorch_lora_weights.safetensors"
            fb = rb / y / "adapter" / "pytorch_lora_weights.safetensors"
            fc = ra / x / "adapter" / "pytorch_lora_weights.safetensors"
            ta, tb, tc = tensors(fa), tensors(fb), tensors(fc)
            same = all(torch.equal(tb[t], tc[t]) for t in tc) and tb.keys() == tc.keys()
            print(f"{name}: {b} resuming a {a} run == {a} resuming it: {same}; ({k}: {b}'s own resume equal: "
                  f"{all(torch.equal(ta[t], tc[t]) for t in tc)})")
            if not same:
                bad.append(f"old-run resume differs: {name}")
    print("DIFFERENCES:" if bad else "ALL EQUAL", *bad[:40], sep="\n  ")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        record(Path(sys.argv[1]), sys.argv[2])
