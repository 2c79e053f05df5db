"""LoRA training step at real model size, naive (encode every step) vs cached inputs.

    python bench/step.py --model sd15                    # GPU: SD-1.5 shapes, 512 px, bf16 autocast
    python bench/step.py --model sdxl --batch 1 --checkpointing   # GPU: SDXL base shapes, 1024 px
    python bench/step.py --model sd35m --batch 1 --checkpointing  # GPU: SD3.5-medium shapes, 1024 px
    python bench/step.py --model sd3_narrow --batch 1    # CPU: SD3 at 1024 px (4096 image tokens), narrow widths
    python bench/step.py --model flux1dev --batch 1 --checkpointing  # GPU: FLUX.1-dev shapes, 1024 px
    python bench/step.py --model flux_narrow --batch 1   # CPU: Flux at 1024 px (4096 image + 512 text tokens), narrow
    python bench/step.py --model flux2_narrow --batch 1  # CPU: FLUX.2 [klein] at 1024 px (a Qwen3 encoder), narrow
    python bench/step.py --model tiny_sdxl               # CPU: the tests' tiny SDXL shapes

No SD-1.5 / SDXL / SD3 weights exist offline, so the components are built from their configs with
random weights: cost per step depends on shapes, not on weight values. The conditioning, the
denoiser's call and the noise process go through the family piece the training module uses
(``toolkit.models.families``): SDXL = two text encoders (penultimate states concatenated, pooled
projection) + size/crop time ids; SD3 = two CLIPs + T5 into an MMDiT, rectified flow; Flux = CLIP (pooled)
+ T5 into double/single-stream blocks over packed 2x2 patches, embedded guidance, the image-size shift;
FLUX.2 [klein] = a Qwen3 LLM's stacked hidden states into the FLUX.2 transformer over patchified,
batch-norm-normalised latents, the image-size shift.
Naive = what diffusers' LoRA training scripts do each step (VAE encode + text encoders + denoiser
fwd/bwd); cached = the denoiser fwd/bwd on stored posterior parameters and prompt embeddings (the
project's latent/text caches). Prints step time, img/s, peak memory (GPU: allocated; CPU: the
process's peak RSS) and model FLOPs utilisation (FLOPs of one step counted with
``torch.utils.flop_counter``, over the GPU's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from diffusers import (
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
)

from miniature.tokenizer import load_clip_tokenizer
from tests.tiny import tiny_qwen_tokenizer, tiny_t5_tokenizer
from toolkit.adapters.inject import add_lora
from toolkit.models.families import SD, SD3, SDXL, Flux, Flux2Klein
from toolkit.models.objectives import sample_timesteps

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, vocab_size=49408)
SD3_VAE = dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
               shift_factor=0.0609)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
# SD3 at its native 1024 px (128x128 latents, 4096 image tokens, 256 T5 tokens) with narrow widths: the
# sequence lengths and layer structure of SD3.5-medium, small enough for a CPU
NARROW_VAE = dict(SD3_VAE, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
NARROW_CLIP = dict(TINY_CLIP, projection_dim=64)
NARROW_T5 = dict(T5_XXL, d_model=160, d_kv=32, d_ff=320, num_layers=2, num_heads=4)
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
             dual_attention_layers=tuple(range(13)))
FLUX_VAE = dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)
FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
# FLUX.1-dev's scheduler config: σ shifted by the packed sequence length
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)
# The configs of the public checkpoints (the fields that set compute), and tiny CPU stand-ins.
MODELS = {
    "sd15": dict(family=SD, res=512, vae=SD_VAE, text=[CLIP_L], unet=dict(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)),
    "sdxl": dict(family=SDXL, res=1024, vae=SD_VAE, text=[CLIP_L, CLIP_BIGG], unet=dict(
        sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), layers_per_block=2,
        block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)),
    "sd35m": dict(family=SD3, res=1024, vae=SD3_VAE, text=[{**CLIP_L, "projection_dim": 768}, CLIP_BIGG],
                  t5=T5_XXL, unet=SD35M),
    "sd3_narrow": dict(family=SD3, res=1024, vae=NARROW_VAE, text=[NARROW_CLIP, {**NARROW_CLIP, "hidden_size": 96,
                                                                                "projection_dim": 96}],
                       t5=NARROW_T5, unet=dict(SD35M, num_layers=4, attention_head_dim=32, num_attention_heads=2,
                                               joint_attention_dim=160, caption_projection_dim=64,
                                               pooled_projection_dim=160, dual_attention_layers=(0, 1))),
    "flux1dev": dict(family=Flux, res=1024, vae=FLUX_VAE, text=[CLIP_L], t5=T5_XXL, unet=FLUX1_DEV),
    # FLUX.1-dev's sequence lengths (4096 image + 512 T5 tokens) and block structure, narrow widths
    "flux_narrow": dict(family=Flux, res=1024, vae=dict(NARROW_VAE, scaling_factor=0.3611, shift_factor=0.1159),
                        text=[TINY_CLIP], t5=NARROW_T5, unet=dict(FLUX1_DEV, num_layers=2, num_single_layers=4,
                                                                  attention_head_dim=32, num_attention_heads=2,
                                                                  joint_attention_dim=160, pooled_projection_dim=64,
                                                                  axes_dims_rope=(8, 12, 12))),
    # FLUX.2 [klein]'s sequence lengths (4096 image tokens of 2x2-patchified 32-channel latents, 512 prompt
    # tokens) and block structure (Qwen3 states after layers 9/18/27 stacked), narrow widths
    "flux2_narrow": dict(family=Flux2Klein, res=1024,
                         vae=dict(latent_channels=32, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                                  norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4),
                         qwen=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=27, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
                                   tie_word_embeddings=True),
                         unet=dict(patch_size=1, in_channels=128, num_layers=2, num_single_layers=4,
                                   attention_head_dim=32, num_attention_heads=2, joint_attention_dim=3 * 64,
                                   timestep_guidance_channels=32, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False)),
    "tiny": dict(family=SD, res=32, vae=TINY_VAE, text=[TINY_CLIP], unet=dict(
        sample_size=16, cross_attention_dim=64, attention_head_dim=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8)),
    "tiny_sdxl": dict(family=SDXL, res=32, vae=TINY_VAE, text=[TINY_CLIP, {**TINY_CLIP, "projection_dim": 32}],
                      unet=dict(sample_size=16, cross_attention_dim=128, attention_head_dim=(2, 4),
                                layers_per_block=1, block_out_channels=(32, 64), transformer_layers_per_block=(1, 2),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}   # dense tensor-core FLOP/s


def base_models(spec: dict, dev: torch.device):
    """Denoiser, VAE and text encoders of a spec, random init, frozen."""
    family = spec["family"]
    with dev:   # random init on the device itself (billions of weights: minutes on the CPU)
        unet = family.denoiser_class(**spec["unet"])
        vae = family.vae_class(**spec["vae"]).eval()
        encoders = [(CLIPTextModelWithProjection if "projection_dim" in t else CLIPTextModel)(CLIPTextConfig(**t))
                    .eval() for t in spec.get("text", [])]
        if "t5" in spec:
            encoders.append(T5EncoderModel(T5Config(**spec["t5"])).eval())
        if "qwen" in spec:
            tok = tiny_qwen_tokenizer()
            encoders.append(Qwen3ForCausalLM(Qwen3Config(**spec["qwen"], vocab_size=len(tok),
                                                         pad_token_id=tok.pad_token_id)).eval())
    for m in (unet, vae, *encoders):
        m.requires_grad_(False)
    return unet, vae, encoders


def build(spec: dict, dev: torch.device, checkpointing: bool):
    unet, vae, encoders = base_models(spec, dev)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    params = add_lora(unet, LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return unet, vae, encoders, params


def step_fn(family, unet, vae, encoders, tokenizers, process, opt, images, prompts, micro, cached, amp, gen):
    """One LoRA step; ``cached`` holds (posterior params, conditioning) or None (naive)."""
    with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
        with torch.no_grad():
            if cached is None:
                params = vae.encode(images).latent_dist.parameters
                cond = family.encode_prompts(tokenizers, encoders, prompts, images.device, family.text_options())
            else:
                params, cond = cached
        latents = family.training_latents(family.posterior_latents(DiagonalGaussianDistribution(params), gen), vae)
        noise = torch.randn(latents.shape, generator=gen, device=latents.device)
        t = sample_timesteps(latents.shape[0], process.num_train_timesteps, generator=gen, device=latents.device)
        at = process.for_latents(latents)   # Flux: σ shifted by the image size
        args, kwargs = family.denoiser_inputs(at.add_noise(latents, noise, t), at.model_timesteps(t), cond,
                                              micro, unet.dtype, family.training_guidance(unet.config, None))
        pred = family.prediction(unet(*args, **kwargs), latents)
        loss = torch.nn.functional.mse_loss(pred.float(), process.target(latents, noise, t).float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="sd15")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--checkpointing", action="store_true", help="UNet gradient checkpointing")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args()
    spec = MODELS[args.model]
    family = spec["family"]
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.model.startswith(("tiny", "sd3_narrow",
                                                                                           "flux_narrow", "flux2"))
                       else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    res, batch = spec["res"], args.batch or (8 if dev.type == "cuda" else 4)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    unet, vae, encoders, params = build(spec, dev, args.checkpointing)
    if args.compile:
        unet.compile()
    tokenizers = [load_clip_tokenizer() for _ in spec.get("text", [])]
    tokenizers += ([tiny_t5_tokenizer()] if "t5" in spec else []) + ([tiny_qwen_tokenizer()] if "qwen" in spec else [])
    opt = torch.optim.AdamW(params, lr=1e-4)
    process = family.noise_process(
        FlowMatchEulerDiscreteScheduler(shift=3.0) if family is SD3 else
        FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER) if family in (Flux, Flux2Klein) else
        DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False))
    gen = torch.Generator(dev).manual_seed(0)
    images = torch.rand(batch, 3, res, res, generator=gen, device=dev) * 2 - 1
    prompts = [f"a photo of object number {i} on a table, studio light" for i in range(batch)]
    micro = torch.tensor([[res, res, 0, 0, res, res]] * batch, dtype=torch.float32, device=dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
        cache = (vae.encode(images).latent_dist.parameters,
                 family.encode_prompts(tokenizers, encoders, prompts, dev, family.text_options()))
    out = {"model": args.model, "family": family.name, "device": torch.cuda.get_device_name() if dev.type == "cuda"
           else "cpu", "torch": torch.__version__, "resolution": res, "batch": batch,
           "gradient_checkpointing": args.checkpointing, "compile": args.compile,
           "denoiser_params": sum(p.numel() for p in unet.parameters()),
           "lora_params": sum(p.numel() for p in params)}
    run = lambda cached: step_fn(family, unet, vae, encoders, tokenizers, process, opt, images, prompts, micro,
                                 cached, amp, gen)
    for name, cached in (("naive", None), ("cached", cache)):
        if name == "naive" and args.skip_naive:
            continue
        with FlopCounterMode(display=False) as fc:
            run(cached)
        flops = fc.get_total_flops()
        for _ in range(args.warmup):
            run(cached)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            run(cached)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - start) / args.steps
        row = {"step_s": dt, "img_per_s": batch / dt, "tflop_per_step": flops / 1e12}
        if dev.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:   # the process's peak resident set so far (ru_maxrss is in KiB on Linux): monotone over phases
            row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            peak = next((p for k, p in PEAK_BF16.items() if k in out["device"]), None)
            if peak:
                row["mfu"] = flops / dt / peak
        out[name] = row
    if "naive" in out:
        out["speedup"] = out["cached"]["img_per_s"] / out["naive"]["img_per_s"]
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
