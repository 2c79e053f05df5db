"""Build tiny, randomly initialised pipelines with the exact SD-1.x, SDXL, SD3, Flux.1 and Flux.2 Klein
component classes.

Used by the tests (and as a starting point for the embedded miniature): they are saved with
``save_pretrained`` and read back through the same ``from_pretrained`` path as a hub model.

    python -m tests.tiny OUT_DIR [--seed 0] [--sdxl | --sd3 | --flux | --flux2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from miniature.tokenizer import load_clip_tokenizer


def build_tiny_pipeline(
    out_dir: str | Path,
    seed: int = 0,
    sample_size: int = 8,
    text_dim: int = 32,
    unet_channels: tuple[int, ...] = (32, 64),
    prediction_type: str = "epsilon",
    vae_channels: tuple[int, ...] = (16, 32),
) -> Path:
    """Write a random SD-layout pipeline (latent ``sample_size``², VAE factor 2^(levels−1): 2 by
    default; ``vae_channels=(8,) * 4`` gives a real SD's factor 8) to ``out_dir``."""
    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        layers_per_block=1, norm_num_groups=8, sample_size=2 ** (len(vae_channels) - 1) * sample_size,
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=unet_channels, norm_num_groups=8, cross_attention_dim=text_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    )
    # clip_sample=False: latents are not in [-1, 1]; clipping them ruins samples.
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        prediction_type=prediction_type, num_train_timesteps=1000, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_sdxl_pipeline(
    out_dir: str | Path,
    seed: int = 0,
    sample_size: int = 8,
    text_dims: tuple[int, int] = (32, 64),
    projection_dim: int = 32,
    time_embed_dim: int = 8,
    unet_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 2,
    vae_channels: tuple[int, ...] = (16, 32),
) -> Path:
    """Write a random SDXL-layout pipeline (latent ``sample_size``², VAE factor 2) to ``out_dir``.

    Same wiring as SDXL base, only smaller: two text encoders whose penultimate hidden states are
    concatenated (``cross_attention_dim = sum(text_dims)``), the pooled projection of the second
    one plus six size/crop ids embedded with ``time_embed_dim`` channels each feeding the UNet's
    ``text_time`` embedding, and SDXL's block pattern (no attention at the highest resolution).

    Args:
        out_dir: where ``save_pretrained`` writes the pipeline.
        seed: torch seed for the random weights.
        sample_size: latent side; images are ``2 * sample_size`` pixels.
        text_dims: hidden sizes of text_encoder (CLIP ViT-L style) and text_encoder_2 (OpenCLIP
            bigG style). They must differ: diffusers' single-file reader tells the two apart by
            their position-embedding width.
        projection_dim: text_encoder_2's pooled-projection size.
        time_embed_dim: ``addition_time_embed_dim`` of the UNet.
        unet_channels: UNet ``block_out_channels`` (one level per entry).
        layers_per_block: resnets per down level (SDXL uses 2).
        vae_channels: VAE ``block_out_channels`` (factor 2^(levels−1); SDXL's 8 is four levels).
    """
    if text_dims[0] == text_dims[1]:
        raise ValueError(f"text_dims must differ (got {text_dims}); see the docstring")
    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer()
    # SDXL's tokenizer_2 (OpenCLIP's) pads with "!" instead of the end token.
    tokenizer_2 = load_clip_tokenizer()
    tokenizer_2.pad_token = "!"

    def text_config(tok, dim: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tok), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=tok.model_max_length, hidden_act=act,
            projection_dim=projection_dim, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )

    # OpenAI CLIP (encoder 1) uses quick_gelu, OpenCLIP bigG (encoder 2) exact gelu.
    text_encoder = CLIPTextModel(text_config(tokenizer, text_dims[0], "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, text_dims[1], "gelu"))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        layers_per_block=1, norm_num_groups=8, sample_size=2 ** (len(vae_channels) - 1) * sample_size,
        force_upcast=True,
    )
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=unet_channels, norm_num_groups=8, cross_attention_dim=sum(text_dims),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        attention_head_dim=tuple(2 * (i + 1) for i in range(n)),
        transformer_layers_per_block=tuple(range(1, n + 1)), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        # six ids (original size, crop top-left, target size) plus the pooled text embedding
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
    )
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


# T5's unigram vocabulary for the tiny SD3: the miniature world's words, then characters for anything else
T5_WORDS = ("a", "an", "the", "of", "on", "in", "at", "large", "medium", "small", "big", "tiny", "red", "green", "blue",
            "yellow", "black", "white", "gray", "beige", "dark", "orange", "purple", "striped", "plain", "circle",
            "square", "triangle", "shape", "center", "top", "bottom", "left", "right", "corner", "background",
            "image", "photo", "style", "painting")


def tiny_t5_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    """A T5 (SentencePiece unigram) tokenizer built offline: transformers 5's ``T5TokenizerFast``
    takes the (piece, log-probability) list itself."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -30.0)]
    vocab += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(T5_WORDS)]
    vocab += [(c, -40.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.'-"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def build_tiny_sd3_pipeline(
    out_dir: str | Path,
    seed: int = 0,
    sample_size: int = 8,
    clip_dims: tuple[int, int] = (32, 64),
    t5_dim: int = 128,
    heads: int = 2,
    head_dim: int = 16,
    num_layers: int = 2,
    latent_channels: int = 16,
    vae_channels: tuple[int, ...] = (16, 32),
) -> Path:
    """Write a random SD3.5-layout pipeline (latent ``sample_size``², VAE factor 2 by default;
    ``vae_channels=(8,) * 4`` gives SD3's factor 8) to ``out_dir``.

    Same wiring as SD3.5-medium, only smaller: CLIP-L (``text_encoder``, its projection the identity,
    as diffusers reads SD3 single files) and CLIP-G (``text_encoder_2``) whose penultimate states are
    concatenated and zero-padded to T5's width and whose pooled outputs make ``pooled_projection_dim``;
    T5 (``text_encoder_3``) with an offline unigram tokenizer; an MMDiT with a dual-attention first
    block and RMS qk-norms; a 16-channel VAE with SD3's scaling and shift factors; the
    flow-matching scheduler with shift 3.

    Args:
        out_dir: where ``save_pretrained`` writes the pipeline.
        seed: torch seed for the random weights.
        sample_size: latent side; images are ``2 * sample_size`` pixels.
        clip_dims: hidden sizes of the two CLIPs (they must differ: diffusers' single-file reader
            tells them apart by their position-embedding width).
        t5_dim: T5's width (the transformer's ``joint_attention_dim``; at least ``sum(clip_dims)``).
        heads, head_dim: the transformer's attention heads and their width.
        num_layers: joint blocks.
        latent_channels: the VAE's latent channels (SD3: 16).
        vae_channels: the VAE's ``block_out_channels`` (one level per entry: factor 2^(n-1)).
    """
    if clip_dims[0] == clip_dims[1] or t5_dim < sum(clip_dims):
        raise ValueError(f"clip_dims must differ and t5_dim >= their sum (got {clip_dims}, {t5_dim})")
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = load_clip_tokenizer(), load_clip_tokenizer()
    tokenizer_2.pad_token = "!"   # SD3's CLIP-G tokenizer pads with "!" (OpenCLIP's), as SDXL's

    def clip(tok, dim: int, act: str) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=tok.model_max_length, hidden_act=act, projection_dim=dim,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    text_encoder, text_encoder_2 = clip(tokenizer, clip_dims[0], "quick_gelu"), clip(tokenizer_2, clip_dims[1], "gelu")
    with torch.no_grad():
        text_encoder.text_projection.weight.copy_(torch.eye(clip_dims[0]))
    tokenizer_3 = tiny_t5_tokenizer()
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=t5_dim, d_kv=t5_dim // 4, d_ff=2 * t5_dim, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=0))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), layers_per_block=1,
        norm_num_groups=8, sample_size=2 ** (len(vae_channels) - 1) * sample_size, scaling_factor=1.5305,
        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=t5_dim, caption_projection_dim=heads * head_dim, pooled_projection_dim=sum(clip_dims),
        pos_embed_max_size=sample_size, dual_attention_layers=(0,), qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_flux_pipeline(
    out_dir: str | Path,
    seed: int = 0,
    clip_dim: int = 32,
    t5_dim: int = 64,
    heads: int = 2,
    head_dim: int = 16,
    num_layers: int = 1,
    num_single_layers: int = 2,
    guidance_embeds: bool = True,
    vae_channels: tuple[int, ...] = (16, 32),
) -> Path:
    """Write a random FLUX.1-layout pipeline (VAE factor 2 by default) to ``out_dir``.

    Same wiring as FLUX.1-dev, only smaller: CLIP-L (``text_encoder``, its pooled output the
    ``pooled_projection_dim``) and T5 (``text_encoder_2``, with an offline unigram tokenizer) whose
    states the transformer takes; double- and single-stream blocks with 3-axis RoPE
    (``axes_dims_rope`` summing to ``head_dim``) over 2x2-packed patches of a 16-channel VAE with
    FLUX.1's scaling and shift factors; embedded guidance (dev; ``guidance_embeds=False``: schnell);
    FLUX.1-dev's scheduler config (dynamic shift from the image's sequence length).

    Args:
        out_dir: where ``save_pretrained`` writes the pipeline.
        seed: torch seed for the random weights.
        clip_dim, t5_dim: the text encoders' widths.
        heads, head_dim: the transformer's attention heads and their width (divisible by 4 for RoPE).
        num_layers, num_single_layers: double- and single-stream blocks.
        guidance_embeds: dev (True) or schnell (False).
        vae_channels: the VAE's ``block_out_channels`` (factor 2^(n-1)).
    """
    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=clip_dim, intermediate_size=2 * clip_dim, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=t5_dim, d_kv=t5_dim // 4, d_ff=2 * t5_dim, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), layers_per_block=1, norm_num_groups=8,
        sample_size=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=t5_dim,
        pooled_projection_dim=clip_dim, guidance_embeds=guidance_embeds, axes_dims_rope=rope)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096) if guidance_embeds \
        else FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


# Qwen3's chat template, reduced to what Flux2KleinPipeline asks of it (a user turn, the generation prompt,
# and the empty think block that enable_thinking=False writes)
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
QWEN3_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def tiny_qwen_tokenizer(model_max_length: int = 32768) -> Qwen2TokenizerFast:
    """A Qwen2 (byte-level BPE) tokenizer built offline: the 256 byte symbols, one merge chain per
    miniature-world word (so each is one token after a space), Qwen3's special tokens and chat template."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for word in ("\u0120" + w for w in T5_WORDS):   # Ġ: the byte-level space
        for i in range(2, len(word) + 1):
            pair = (word[: i - 1], word[i - 1])
            if word[:i] not in vocab:
                vocab[word[:i]] = len(vocab)
                merges.append(pair)
    for tok in QWEN3_SPECIAL:
        vocab[tok] = len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN3_SPECIAL[1:])})
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def build_tiny_flux2_klein_pipeline(
    out_dir: str | Path,
    seed: int = 0,
    text_dim: int = 16,
    text_layers: int = 27,
    heads: int = 2,
    head_dim: int = 16,
    num_layers: int = 1,
    num_single_layers: int = 2,
    latent_channels: int = 8,
    vae_channels: tuple[int, ...] = (16, 32),
) -> Path:
    """Write a random FLUX.2 [klein]-layout pipeline (VAE factor 2 by default) to ``out_dir``.

    Same wiring as FLUX.2-klein-base, only smaller: a text-only Qwen3 causal LM (``text_encoder``;
    ``text_layers`` deep so that the hidden states the pipeline stacks, layers 9, 18 and 27, exist) with
    an offline byte-level BPE tokenizer and Qwen3's chat template; the transformer's
    ``joint_attention_dim`` is three of its widths (the stacked layers); double- and single-stream
    blocks with 4-axis RoPE (``axes_dims_rope`` summing to ``head_dim``) over the VAE's 2x2-patchified
    latents, no guidance embedding (Klein is guided by CFG); ``AutoencoderKLFlux2`` whose batch-norm
    statistics normalise the patchified latents (random non-trivial statistics here, so that a missed
    normalisation shows); FLUX.2's scheduler config (dynamic shift).

    Args:
        out_dir: where ``save_pretrained`` writes the pipeline.
        seed: torch seed for the random weights.
        text_dim, text_layers: the Qwen3 encoder's width and depth (at least 27 layers).
        heads, head_dim: the transformer's attention heads and their width (divisible by 4 for RoPE).
        num_layers, num_single_layers: double- and single-stream blocks.
        latent_channels: the VAE's latent channels (FLUX.2: 32); the transformer takes four times as many.
        vae_channels: the VAE's ``block_out_channels`` (factor 2^(n-1)).
    """
    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim,
        num_hidden_layers=text_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=text_dim // 2,
        max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>")))
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), layers_per_block=1, norm_num_groups=8,
        sample_size=32)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    q = head_dim // 4
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=3 * text_dim,
        timestep_guidance_channels=32, axes_dims_rope=(q, q, q, head_dim - 3 * q), guidance_embeds=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = Flux2KleinPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sdxl", action="store_true", help="SDXL layout (two text encoders) instead of SD-1.x")
    ap.add_argument("--sd3", action="store_true", help="SD3.5 layout (MMDiT, two CLIPs and T5)")
    ap.add_argument("--flux", action="store_true", help="FLUX.1-dev layout (CLIP and T5, packed patches)")
    ap.add_argument("--flux2", action="store_true", help="FLUX.2 [klein] layout (a Qwen3 text encoder)")
    args = ap.parse_args()
    build = build_tiny_sdxl_pipeline if args.sdxl else build_tiny_sd3_pipeline if args.sd3 else \
        build_tiny_flux_pipeline if args.flux else build_tiny_flux2_klein_pipeline if args.flux2 else \
        build_tiny_pipeline
    print(build(args.out_dir, seed=args.seed))
