"""LoRA training step at Stable-Diffusion-1.5 size: naive (encode every step) vs cached inputs.

    python bench/sd15_step.py                 # GPU: SD-1.5 shapes, 512 px, bf16 autocast
    python bench/sd15_step.py --tiny          # CPU smoke run with small shapes

No SD-1.5 weights exist offline, so the components are built from SD-1.5's configs with random
weights: cost per step depends on shapes, not on weight values. Naive = what diffusers'
``train_text_to_image_lora.py`` does each step (VAE encode + text encoder + UNet fwd/bwd);
cached = the UNet fwd/bwd on stored posterior parameters and prompt embeddings (the project's
latent/text caches). Prints step time, img/s, peak memory and model FLOPs utilisation (FLOPs
of one step counted with ``torch.utils.flop_counter``, over the GPU's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from toolkit.models.lora import add_lora
from toolkit.models.objectives import sample_timesteps, training_target

# SD-1.5 (runwayml/stable-diffusion-v1-5) component configs, the fields that set compute.
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408)
TINY_UNET = dict(sample_size=8, cross_attention_dim=64, attention_head_dim=4, layers_per_block=1,
                 block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
TINY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, vocab_size=49408)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}   # dense tensor-core FLOP/s


def step_fn(unet, vae, text, scheduler, opt, images, ids, cached, amp_dtype, gen):
    """One LoRA step; ``cached`` holds (posterior params, prompt embeddings) or None (naive)."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        with torch.no_grad():
            if cached is None:
                params = vae.encode(images).latent_dist.parameters
                embeds = text(ids)[0]
            else:
                params, embeds = cached
        latents = DiagonalGaussianDistribution(params).sample(gen) * 0.18215
        noise = torch.randn(latents.shape, generator=gen, device=latents.device)
        t = sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, generator=gen,
                             device=latents.device)
        noisy = scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, embeds).sample
        loss = torch.nn.functional.mse_loss(pred.float(), training_target(scheduler, latents, noise, t).float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    u, v, t = (TINY_UNET, TINY_VAE, TINY_TEXT) if args.tiny else (SD15_UNET, SD15_VAE, SD15_TEXT)
    res = 8 * u["sample_size"] if not args.tiny else 32
    batch = args.batch or (4 if args.tiny else 8)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    unet = UNet2DConditionModel(**u).to(dev)
    vae = AutoencoderKL(**v).to(dev).eval()
    text = CLIPTextModel(CLIPTextConfig(**t)).to(dev).eval()
    for m in (unet, vae, text):
        m.requires_grad_(False)
    params = add_lora(unet, LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    opt = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False)
    gen = torch.Generator(dev).manual_seed(0)
    images = torch.rand(batch, 3, res, res, generator=gen, device=dev) * 2 - 1
    ids = torch.randint(0, t["vocab_size"], (batch, 77), generator=gen, device=dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
        cache = (vae.encode(images).latent_dist.parameters, text(ids)[0])
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "resolution": res, "batch": batch,
           "unet_params": sum(p.numel() for p in unet.parameters()), "lora_params": sum(p.numel() for p in params)}
    for name, cached in (("naive", None), ("cached", cache)):
        with FlopCounterMode(display=False) as fc:
            step_fn(unet, vae, text, scheduler, opt, images, ids, cached, amp, gen)
        flops = fc.get_total_flops()
        for _ in range(args.warmup):
            step_fn(unet, vae, text, scheduler, opt, images, ids, cached, amp, gen)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            step_fn(unet, vae, text, scheduler, opt, images, ids, cached, amp, gen)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - start) / args.steps
        row = {"step_s": dt, "img_per_s": batch / dt, "tflop_per_step": flops / 1e12}
        if dev.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            peak = next((p for k, p in PEAK_BF16.items() if k in out["device"]), None)
            if peak:
                row["mfu"] = flops / dt / peak
        out[name] = row
    out["speedup"] = out["cached"]["img_per_s"] / out["naive"]["img_per_s"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
