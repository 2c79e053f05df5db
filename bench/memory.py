"""The memory plan's estimates against measured peaks: phase × model layout × precision.

    python bench/memory.py                                  # the CPU table (a fresh process per cell)
    python bench/memory.py --cells sd15_mid:encode:fp32:512:4 --json out.json
    python bench/memory.py --write-configs sdxl /tmp/sdxl    # configs only; run.py model.name_or_path=/tmp/sdxl --plan
    python bench/memory.py --device cuda --cells sdxl:encode:fp32:1024:3   # GPU: plan gpu mode vs the allocator

Each cell builds the components a phase runs from their configs (random weights at the layout's
real shapes: memory depends on shapes, not values), then runs the phase once and reads the
process's peak resident memory (VmHWM, reset with /proc/self/clear_refs after the weights exist;
a train step runs twice, so the optimizer's state is alive in the second). The estimate is what
the plan computes: this process's resident memory before any weight was built (libraries) + the
weights' bytes from the configs (``toolkit.models.quantize.quantized_bytes``) + the phase's
traced peak (``toolkit.models.footprints``). "phase" columns compare the phase alone: measured
peak − resident memory just before it, against the traced peak.

Layouts: ``tiny_sd`` / ``tiny_sdxl`` (the tests' tiny models), ``sd15_mid`` / ``sdxl_mid`` (SD-1.5's
and SDXL's block layouts at a quarter of the width, text encoders shrunk), ``sd15`` / ``sdxl``
(the published configs: bench/step.py). Phases: ``encode`` (VAE encode, no grad), ``decode``,
``text`` (the family's text encoders), ``denoise`` (one guided sampling step of the UNet),
``step`` (a LoRA step: forward, backward, AdamW; r 4 on attention). Precisions: ``fp32``,
``bf16`` (weights), ``int8`` (the UNet's Linear weights through torchao, as model.quantize=int8).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.step import CLIP_BIGG, CLIP_L, MODELS, SD_VAE, TINY_CLIP, TINY_VAE  # noqa: E402

MID_VAE = dict(SD_VAE, block_out_channels=(32, 64, 128, 128))
MID_CLIP = dict(TINY_CLIP, hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4)
MID_BIGG = dict(MID_CLIP, hidden_size=320, intermediate_size=1280, num_attention_heads=5, hidden_act="gelu",
                projection_dim=320)
LAYOUTS = {
    "tiny_sd": dict(MODELS["tiny"], vae=TINY_VAE, text=[TINY_CLIP]),
    "tiny_sdxl": MODELS["tiny_sdxl"],
    "sd15_mid": dict(MODELS["sd15"], vae=MID_VAE, text=[MID_CLIP], unet=dict(
        MODELS["sd15"]["unet"], block_out_channels=(80, 160, 320, 320), norm_num_groups=16, cross_attention_dim=192)),
    "sdxl_mid": dict(MODELS["sdxl"], vae=MID_VAE, text=[MID_CLIP, MID_BIGG], unet=dict(
        MODELS["sdxl"]["unet"], block_out_channels=(80, 160, 320), norm_num_groups=16, cross_attention_dim=512,
        transformer_layers_per_block=(1, 2, 4), addition_time_embed_dim=64,
        projection_class_embeddings_input_dim=6 * 64 + 320)),
    "sd15": dict(MODELS["sd15"], vae=SD_VAE, text=[CLIP_L]),
    "sdxl": dict(MODELS["sdxl"], vae=SD_VAE, text=[CLIP_L, CLIP_BIGG]),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}
PHASE_PARTS = {"encode": ("vae",), "decode": ("vae",), "text": ("text",), "denoise": ("unet",), "step": ("unet",)}


def vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak(device: str = "cpu") -> int:
    """Free what can be freed, return it to the OS, and restart the peak at the current RSS (on a GPU: at
    what torch's allocator holds now; the peak is then ``torch.cuda.max_memory_allocated``)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return psutil.Process().memory_info().rss


def skeletons(layout: str) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from toolkit.models.footprints import meta_init

    spec = LAYOUTS[layout]
    with meta_init():
        return {"unet": UNet2DConditionModel(**spec["unet"]).requires_grad_(False),
                "vae": AutoencoderKL(**spec["vae"]).eval(),
                "text": [(CLIPTextModelWithProjection if "projection_dim" in t else CLIPTextModel)(CLIPTextConfig(**t))
                         for t in spec["text"]]}


def real(skel: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The skeleton with real weights (small random values, every page written) in ``dtype``."""
    import copy

    m = copy.deepcopy(skel).to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for t in (*m.parameters(), *m.buffers()):
            if t.is_floating_point():
                t.normal_(0, 0.02)
        for name, buf in skel.named_buffers():   # real buffers of the skeleton (CLIP's position ids) kept
            if not buf.is_meta:
                m.get_buffer(name).copy_(buf)
    return m.eval()


def lora(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    from toolkit.adapters.inject import add_lora

    return add_lora(unet, LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


def run_phase(layout: str, phase: str, precision: str, res: int, batch: int, ckpt: bool, device: str = "cpu") -> dict:
    """Build, reset the peak, run the phase: the measured side of one cell (``device``: cpu, the process's
    resident memory; cuda, torch's allocator on the GPU, the weights moved there)."""
    from toolkit.models.families import SD, SDXL
    from toolkit.models.footprints import StandInTokenizer, context_length

    base = reset_peak(device)   # the libraries only (cuda: nothing yet)
    spec, dtype = LAYOUTS[layout], DTYPES[precision]
    family = SDXL if spec["family"] is SDXL else SD
    sk = skeletons(layout)
    latent = (res // 2 ** (len(spec["vae"]["block_out_channels"]) - 1),) * 2
    parts = PHASE_PARTS[phase]
    vae = real(sk["vae"], torch.float32 if dtype != torch.float32 and family is SDXL else dtype).to(device) \
        if "vae" in parts else None
    encs = [real(e, dtype).to(device) for e in sk["text"]] if "text" in parts else []
    unet = real(sk["unet"], dtype).to(device) if "unet" in parts else None
    if unet is not None and precision == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(unet, Int8WeightOnlyConfig())
    params = None
    if phase == "step":
        params = lora(unet)
        if ckpt:
            unet.enable_gradient_checkpointing()
        opt = torch.optim.AdamW(params, lr=1e-4)
    cond_dim = spec["unet"].get("cross_attention_dim")
    before = reset_peak(device)
    zeros = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    with torch.no_grad() if phase != "step" else torch.enable_grad():
        if phase == "encode":
            vae.encode(zeros(batch, 3, res, res, dtype=vae.dtype)).latent_dist.parameters.sum()
        elif phase == "decode":
            vae.decode(zeros(batch, 4, *latent, dtype=vae.dtype))
        elif phase == "text":
            family.encode_prompts([StandInTokenizer(context_length(e)) for e in encs], encs, ["x"] * batch, device)
        else:
            rows = 2 * batch if phase == "denoise" else batch
            kw = {"encoder_hidden_states": zeros(rows, 77, cond_dim, dtype=dtype)}
            if family is SDXL:
                proj = spec["text"][-1]["projection_dim"]
                kw["added_cond_kwargs"] = {"text_embeds": zeros(rows, proj, dtype=dtype),
                                           "time_ids": zeros(rows, 6, dtype=dtype)}
            for _ in range(2 if phase == "step" else 1):
                out = unet(zeros(rows, 4, *latent, dtype=dtype), zeros(rows, dtype=torch.long), **kw).sample
                if phase == "step":
                    out.float().pow(2).mean().backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                del out
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else vmhwm()
    return {"rss_libraries": base, "rss_before_phase": before, "peak": peak}


def estimate(layout: str, phase: str, precision: str, res: int, batch: int, ckpt: bool, traces: str | None,
             device: str = "cpu") -> dict:
    """The plan's side of one cell: weights from the configs + the traced phase (the plan's gpu mode on cuda:
    the attention kernels that hold no whole attention matrix)."""
    mode = "gpu" if device == "cuda" else "cpu"
    from functools import partial

    from toolkit.models import footprints as fp
    from toolkit.models.families import SD, SDXL
    from toolkit.models.quantize import quantized_bytes

    spec, dtype = LAYOUTS[layout], DTYPES[precision]
    family = SDXL if spec["family"] is SDXL else SD
    sk = skeletons(layout)
    latent = (res // 2 ** (len(spec["vae"]["block_out_channels"]) - 1),) * 2
    vdt = torch.float32 if dtype != torch.float32 and family is SDXL else dtype
    text, fields = fp.text_encode(family, sk["text"], dtype, traces)
    quant = "int8" if precision == "int8" else None
    if phase == "encode":
        return {"weights": quantized_bytes(sk["vae"], None, vdt),
                "phase": fp.vae_encode(sk["vae"], (res, res), vdt, traces).at(batch)}
    if phase == "decode":
        return {"weights": quantized_bytes(sk["vae"], None, vdt),
                "phase": fp.vae_decode(sk["vae"], latent, vdt, traces).at(batch)}
    if phase == "text":
        return {"weights": sum(quantized_bytes(e, None, dtype) for e in sk["text"]), "phase": text.at(batch)}
    weights = quantized_bytes(sk["unet"], quant, dtype)
    if phase == "denoise":
        return {"weights": weights, "phase": fp.denoise(family, sk["unet"], fields, latent, dtype, True, mode, None,
                                                        traces).at(batch)}

    def adapt(unet: torch.nn.Module) -> None:
        lora(unet)
        if ckpt:
            unet.enable_gradient_checkpointing()

    st = fp.train_step(family, sk["unet"], fields, latent, batch, dtype, partial(torch.optim.AdamW, lr=1e-4), adapt,
                       f"r4-attention-ckpt{ckpt}", mode, None, 4, traces)
    return {"weights": weights + st["adapter"], "phase": st["activations"] + st["optimizer_state"]}


def cell(name: str, traces: str | None, device: str = "cpu") -> dict:
    layout, phase, precision, res, batch, *rest = name.split(":")
    ckpt = bool(rest and rest[0] == "ckpt")
    args = (layout, phase, precision, int(res), int(batch), ckpt)
    measured = run_phase(*args, device)
    est = estimate(*args, traces, device)
    total_est = measured["rss_libraries"] + est["weights"] + est["phase"]
    phase_meas = measured["peak"] - measured["rss_before_phase"]
    return {"cell": name, **measured, "weights_estimated": est["weights"],
            "weights_measured": measured["rss_before_phase"] - measured["rss_libraries"],
            "phase_estimated": est["phase"], "phase_measured": phase_meas, "total_estimated": total_est,
            "total_error": total_est / measured["peak"] - 1,
            "phase_error": est["phase"] / phase_meas - 1 if phase_meas > 0 else None}


def fresh(name: str, traces: str | None, device: str = "cpu") -> dict:
    """One cell in a fresh process (its own libraries, nothing else alive)."""
    cmd = [sys.executable, __file__, "--cells", name, "--json", "-", "--device", device] + \
        (["--traces", traces] if traces else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if res.returncode:
        raise RuntimeError(f"cell {name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])[0]


GiB = 2**30
TABLE = [
    "tiny_sd:encode:fp32:64:8", "tiny_sd:step:fp32:64:8", "tiny_sdxl:step:fp32:64:8",
    "sd15_mid:encode:fp32:512:4", "sd15_mid:decode:fp32:512:1", "sd15_mid:decode:fp32:512:2",
    "sd15_mid:text:fp32:512:16",
    "sd15_mid:denoise:fp32:512:4", "sd15_mid:step:fp32:512:2", "sd15_mid:step:fp32:512:2:ckpt",
    "sd15_mid:step:int8:512:2", "sd15_mid:step:bf16:512:2",
    "sdxl_mid:encode:fp32:1024:1", "sdxl_mid:denoise:fp32:1024:1", "sdxl_mid:step:fp32:1024:1:ckpt",
    "sdxl_mid:step:int8:1024:1:ckpt",
    "sd15:encode:fp32:512:2", "sd15:decode:fp32:512:1", "sd15:text:fp32:512:16", "sd15:denoise:fp32:512:1",
    "sd15:step:fp32:512:1:ckpt", "sd15:step:int8:512:1:ckpt",
    "sdxl:encode:fp32:1024:1", "sdxl:decode:fp32:1024:1", "sdxl:text:bf16:1024:16", "sdxl:denoise:bf16:512:1",
    "sdxl:step:bf16:256:1:ckpt", "sdxl:step:bf16:512:1:ckpt",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="*", help="layout:phase:precision:resolution:batch[:ckpt] (default: the table)")
    ap.add_argument("--json", help="write the rows here ('-': stdout, one line)")
    ap.add_argument("--traces", default=None, help="keep traced footprints in this folder")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: peaks from torch's GPU allocator against the plan's gpu mode (libraries not counted)")
    ap.add_argument("--write-configs", nargs=2, metavar=("LAYOUT", "DIR"),
                    help="write LAYOUT's configs (no weights) as a pipeline folder, for --plan")
    args = ap.parse_args()
    if args.write_configs:
        print(write_configs(args.write_configs[0], Path(args.write_configs[1])))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.cells and args.json == "-":   # a child: measure in this process, with the entry's allocator policy
        from toolkit.allocator import fix_mmap_threshold

        fix_mmap_threshold()
        print(json.dumps([cell(c, args.traces, args.device) for c in args.cells]))
        return
    rows = []
    for name in args.cells or TABLE:
        try:
            r = fresh(name, args.traces, args.device)
        except RuntimeError as err:   # one cell's failure (e.g. out of RAM) is reported, the table goes on
            print(f"{name:<34} FAILED: {str(err)[-400:]}", flush=True)
            continue
        rows.append(r)
        print(f"{name:<34} weights {r['weights_estimated'] / GiB:6.2f} est / {r['weights_measured'] / GiB:6.2f} GiB"
              f" · phase {r['phase_estimated'] / GiB:6.2f} / {r['phase_measured'] / GiB:6.2f} GiB"
              f" · peak {r['total_estimated'] / GiB:6.2f} / {r['peak'] / GiB:6.2f} GiB ({r['total_error']:+.1%})",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))



def write_configs(layout: str, out: Path) -> Path:
    """A pipeline folder holding only the configs of ``layout`` (no weights, no tokenizer files):
    what the plan reads, so ``python run.py ... model.name_or_path=<out> --plan`` plans SD-1.5 or
    SDXL without their weights."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler
    from transformers import CLIPTextConfig

    from toolkit.models.families import SDXL

    spec, sk = LAYOUTS[layout], skeletons(layout)
    sk["unet"].save_config(out / "unet")
    sk["vae"].save_config(out / "vae")
    xl = spec["family"] is SDXL
    sched = (EulerDiscreteScheduler if xl else DDPMScheduler)(beta_schedule="scaled_linear", beta_start=0.00085,
                                                              beta_end=0.012, num_train_timesteps=1000)
    sched.save_config(out / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", type(sched).__name__]}
    names = ["text_encoder", "text_encoder_2"][: len(spec["text"])]
    for name, text in zip(names, spec["text"]):
        cls = "CLIPTextModelWithProjection" if "projection_dim" in text else "CLIPTextModel"
        CLIPTextConfig(**text, architectures=[cls]).save_pretrained(out / name)
        index[name] = ["transformers", cls]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    (out / "model_index.json").write_text(json.dumps(index, indent=1))
    return out


if __name__ == "__main__":
    main()
