"""Single-file export (toolkit/models/single_file.py), checked against the consumer: diffusers' own
``from_single_file`` and its ``convert_ldm_*`` readers must give back every tensor of the folder and
the same image; anything the layout cannot express must raise before a file exists."""

from __future__ import annotations

import re
import types

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tests.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
from toolkit.config import ROOT
from toolkit.models import single_file as sf

MINIATURE = ROOT / "data" / "miniature" / "sd"
COMPONENTS = {"sd1": ("unet", "vae", "text_encoder"), "sd2": ("unet", "vae", "text_encoder"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}


def _sd2_like(folder) -> None:
    """The tiny SD pipeline turned SD-2.x-like: OpenCLIP's GELU text encoder, linear attention projections,
    v-prediction."""
    build_tiny_pipeline(folder, seed=2, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    torch.manual_seed(3)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), "hidden_act": "gelu"}))
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "use_linear_projection": True})
    pipe.save_pretrained(folder)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run ~50x faster on one thread than on two contended ones (OpenMP barriers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[str, type]]:
    root = tmp_path_factory.mktemp("single-file")
    _sd2_like(root / "sd2")
    return {
        "tiny_sd": (str(build_tiny_pipeline(root / "sd", seed=0)), StableDiffusionPipeline),
        "miniature": (str(MINIATURE), StableDiffusionPipeline),
        "tiny_sd2": (str(root / "sd2"), StableDiffusionPipeline),
        "tiny_sdxl": (str(build_tiny_sdxl_pipeline(root / "sdxl", seed=0)), StableDiffusionXLPipeline),
    }


@pytest.fixture(scope="module")
def originals(folders):
    """Each case's pipeline loaded from its folder, once (tokenizer loading dominates on CPU)."""
    cache = {}

    def get(case):
        if case not in cache:
            folder, cls = folders[case]
            cache[case] = cls.from_pretrained(folder)
        return cache[case]

    return get


def _assert_same_tensors(original, loaded, cast: torch.dtype | None = None) -> None:
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k, v in a.items():
        expect = v if cast is None else v.to(cast)
        assert b[k].dtype == expect.dtype and torch.equal(b[k], expect), k


def _image(pipe) -> torch.Tensor:
    out = pipe("a red cube on a table", num_inference_steps=2, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    return torch.from_numpy(out * 255).round()


@pytest.mark.parametrize(("case", "layout"), [("tiny_sd", "sd1"), ("miniature", "sd1"), ("tiny_sd2", "sd2"),
                                              ("tiny_sdxl", "sdxl")])
def test_diffusers_reads_back_every_tensor_and_the_same_image(folders, originals, case, layout, tmp_path):
    folder, cls = folders[case]
    pipe = originals(case)
    assert sf.single_file_layout(pipe) == layout
    path = sf.pipeline_to_single_file(pipe, tmp_path / "model.safetensors", dtype=torch.float32,
                                      metadata={"source": case})

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"source": case}
        assert f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight").ndim == 4  # 1x1 conv, as in LDM
    prefixes = ("model.diffusion_model.", "first_stage_model.",
                *(prefix for _, prefix, _ in sf.TEXT_ENCODERS[layout]))
    assert all(k.startswith(prefixes) for k in keys)
    # Nothing extra: the reader ignores unknown keys silently, so count them. The OpenCLIP layout
    # fuses q, k, v into one in_proj tensor (two fewer keys per in_proj).
    n_sources = sum(len(getattr(pipe, c).state_dict()) for c in COMPONENTS[layout])
    assert len(keys) == n_sources - 2 * sum(".attn.in_proj_" in k for k in keys)
    assert {"sd1": "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            "sd2": "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
            "sdxl": "conditioner.embedders.1.model.text_projection"}[layout] in keys
    assert (layout == "sdxl") == ("model.diffusion_model.label_emb.0.0.weight" in keys)

    loaded = cls.from_single_file(str(path), config=folder, local_files_only=True)
    for name in COMPONENTS[layout]:
        _assert_same_tensors(getattr(pipe, name), getattr(loaded, name))
    assert (_image(pipe) - _image(loaded)).abs().max() <= 1


@pytest.mark.parametrize(("case", "dtype"), [("tiny_sd", torch.bfloat16), ("tiny_sdxl", torch.float16)])
def test_half_precision_file_holds_the_cast_weights(folders, originals, case, dtype, tmp_path):
    folder, cls = folders[case]
    pipe = originals(case)
    path = sf.pipeline_to_single_file(pipe, tmp_path / "half.safetensors", dtype=dtype)
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
        assert {f.get_tensor(k).dtype for k in names} == {dtype}
    # Weights come from the file; the tokenizers are passed in to skip rebuilding them (the full load is above).
    tokenizers = {k: v for k, v in pipe.components.items() if k.startswith("tokenizer")}
    loaded = cls.from_single_file(str(path), config=folder, local_files_only=True, torch_dtype=dtype, **tokenizers)
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if cls is StableDiffusionXLPipeline else ()):
        _assert_same_tensors(getattr(pipe, name), getattr(loaded, name), cast=dtype)


# ---- the key mappings alone, against diffusers' readers, over shapes the pipelines above do not cover


@pytest.mark.parametrize("layers_per_block", [1, 2, 3])
@pytest.mark.parametrize(("down", "up"), [
    (("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D",
                                                                       "CrossAttnUpBlock2D")),
    (("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
     ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
])
def test_unet_mapping_inverts_the_diffusers_reader(layers_per_block, down, up):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=layers_per_block, block_out_channels=(8,) * len(down), norm_num_groups=4,
        cross_attention_dim=8, attention_head_dim=2, down_block_types=down, up_block_types=up,
        transformer_layers_per_block=2, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=28,
    )
    state = unet.state_dict()
    ldm = sf.unet_to_ldm(state, unet.config)
    assert len(ldm) == len(state)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)


def _skeleton(ldm: dict) -> set[str]:
    """The block structure of an LDM UNet: ``input_blocks.3.0.op``, ``output_blocks.2.1``, ``middle_block.1``..."""
    found = (re.match(r"model\.diffusion_model\.((?:input|output)_blocks\.\d+\.\d+(?:\.op|\.conv)?|middle_block\.\d+|"
                      r"label_emb\.0\.\d+)\.", k) for k in ldm)
    return {m.group(1) for m in found if m}


# Written down from the original checkpoints (openaimodel.py's module tree): the diffusers reader also
# accepts an upsampler at .1.conv behind an attention, A1111 and ComfyUI do not.
SD15_SKELETON = (
    "input_blocks.0.0 input_blocks.1.0 input_blocks.1.1 input_blocks.2.0 input_blocks.2.1 input_blocks.3.0.op "
    "input_blocks.4.0 input_blocks.4.1 input_blocks.5.0 input_blocks.5.1 input_blocks.6.0.op input_blocks.7.0 "
    "input_blocks.7.1 input_blocks.8.0 input_blocks.8.1 input_blocks.9.0.op input_blocks.10.0 input_blocks.11.0 "
    "middle_block.0 middle_block.1 middle_block.2 output_blocks.0.0 output_blocks.1.0 output_blocks.2.0 "
    "output_blocks.2.1.conv output_blocks.3.0 output_blocks.3.1 output_blocks.4.0 output_blocks.4.1 output_blocks.5.0 "
    "output_blocks.5.1 output_blocks.5.2.conv output_blocks.6.0 output_blocks.6.1 output_blocks.7.0 output_blocks.7.1 "
    "output_blocks.8.0 output_blocks.8.1 output_blocks.8.2.conv output_blocks.9.0 output_blocks.9.1 output_blocks.10.0 "
    "output_blocks.10.1 output_blocks.11.0 output_blocks.11.1")
SDXL_SKELETON = (
    "input_blocks.0.0 input_blocks.1.0 input_blocks.2.0 input_blocks.3.0.op input_blocks.4.0 input_blocks.4.1 "
    "input_blocks.5.0 input_blocks.5.1 input_blocks.6.0.op input_blocks.7.0 input_blocks.7.1 input_blocks.8.0 "
    "input_blocks.8.1 middle_block.0 middle_block.1 middle_block.2 output_blocks.0.0 output_blocks.0.1 "
    "output_blocks.1.0 output_blocks.1.1 output_blocks.2.0 output_blocks.2.1 output_blocks.2.2.conv output_blocks.3.0 "
    "output_blocks.3.1 output_blocks.4.0 output_blocks.4.1 output_blocks.5.0 output_blocks.5.1 output_blocks.5.2.conv "
    "output_blocks.6.0 output_blocks.7.0 output_blocks.8.0 label_emb.0.0 label_emb.0.2")


@pytest.mark.parametrize(("down", "up", "xl", "expected"), [
    (("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, False,
     SD15_SKELETON),
    (("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2, ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), True,
     SDXL_SKELETON),
], ids=["sd15", "sdxl"])
def test_unet_block_numbering_matches_the_original_checkpoints(down, up, xl, expected):
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=28)
    unet = UNet2DConditionModel(sample_size=8, layers_per_block=2, block_out_channels=(8,) * len(down),
                                norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2, down_block_types=down,
                                up_block_types=up, **(extra if xl else {}))
    assert _skeleton(sf.unet_to_ldm(unet.state_dict(), unet.config)) == set(expected.split())


def test_vae_mapping_inverts_the_diffusers_reader():
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=4)
    state = vae.state_dict()
    ldm = sf.vae_to_ldm(state, vae.config)
    # Original checkpoints (and A1111/ComfyUI) hold the mid attention as 1x1 convs; the reader takes 2-D too.
    assert all(ldm[f"first_stage_model.{side}.mid.attn_1.{n}.weight"].ndim == 4
               for side in ("encoder", "decoder") for n in ("q", "k", "v", "proj_out"))
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in ldm  # up.0 is the full-resolution level
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in ldm
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def _text_config(**kw) -> CLIPTextConfig:
    return CLIPTextConfig(**{"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
                             "num_attention_heads": 2, "max_position_embeddings": 8, "projection_dim": 8,
                             "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, **kw})


def test_text_encoder_mappings_invert_the_diffusers_readers():
    clip = CLIPTextModel(_text_config())
    state = clip.state_dict()
    back = convert_ldm_clip_checkpoint(sf.clip_text_to_ldm(state, "conditioner.embedders.0.transformer."))
    assert back.keys() == {f"text_model.{k}" for k in state}
    assert all(torch.equal(back[f"text_model.{k}"], v) for k, v in state.items())

    bigg = CLIPTextModelWithProjection(_text_config(hidden_act="gelu"))
    state = bigg.state_dict()
    prefix = "conditioner.embedders.1.model."
    ldm = sf.open_clip_text_to_ldm(state, prefix)
    assert ldm[prefix + "text_projection"].shape == (16, 8)  # OpenCLIP: x @ P, (width, projection)
    back = convert_open_clip_checkpoint(bigg, ldm, prefix=prefix)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


# ---- refusals: nothing is written


UNET_CFG = dict(UNet2DConditionModel.load_config(MINIATURE / "unet"))


@pytest.mark.parametrize(("change", "named"), [
    ({"layers_per_block": [1, 2]}, "layers_per_block"),
    ({"down_block_types": ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]}, "block types"),
    ({"mid_block_type": "UNetMidBlock2D"}, "mid_block_type"),
    ({"addition_embed_type": "text"}, "addition_embed_type"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"time_cond_proj_dim": 8}, "time_cond_proj_dim"),
    ({"dual_cross_attention": True}, "dual_cross_attention"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
])
def test_unet_configs_the_layout_cannot_express_are_refused(change, named):
    with pytest.raises(ValueError, match=named):
        sf.unet_to_ldm({}, {**UNET_CFG, **change})


def test_key_level_gaps_are_refused():
    unet = UNet2DConditionModel.from_pretrained(MINIATURE / "unet")
    state = unet.state_dict()
    with pytest.raises(ValueError, match="no place in the LDM layout"):
        sf.unet_to_ldm({**state, "time_embedding.cond_proj.weight": torch.zeros(1)}, unet.config)
    with pytest.raises(ValueError, match="no place in the LDM layout"):  # a layer the config does not declare
        sf.unet_to_ldm(state, {**unet.config, "layers_per_block": 0})
    bigg = CLIPTextModelWithProjection(_text_config()).state_dict()
    del bigg["text_model.encoder.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match="needs 3 parts"):
        sf.open_clip_text_to_ldm(bigg, "conditioner.embedders.1.model.")
    with pytest.raises(ValueError, match="both map to"):
        sf._remap({"a": torch.zeros(1), "b": torch.zeros(1)}, lambda k: ("x", 0, 1), "test", "")


def _pipe(**components):
    return types.SimpleNamespace(**components)


@pytest.fixture(scope="module")
def tiny_parts(originals):
    pipe = originals("tiny_sd")
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}


@pytest.mark.parametrize(("make", "named"), [
    (lambda p: _pipe(**{**p, "text_encoder": CLIPTextModel(_text_config(hidden_act="gelu", num_hidden_layers=24))}),
     "24 layers"),
    (lambda p: _pipe(**{**p, "text_encoder": CLIPTextModelWithProjection(_text_config(hidden_act="gelu"))}),
     "text_projection"),
    (lambda p: _pipe(**{**p, "text_encoder": CLIPTextModelWithProjection(_text_config())}), "no place"),
    (lambda p: _pipe(**{**p, "unet": UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(8, 8), norm_num_groups=4, cross_attention_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=28)}),
     r"needs \['text_encoder_2'\]"),
    (lambda p: _pipe(**{**p, "vae": None}), r"needs \['vae'\]"),
])
def test_pipelines_the_layout_cannot_express_leave_the_file_alone(tiny_parts, make, named, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError, match=named):
        sf.pipeline_to_single_file(make(tiny_parts), path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left


def test_count_check_catches_a_mapping_that_drops_a_tensor(tiny_parts, monkeypatch, tmp_path):
    def lossy(state, prefix):
        out = sf.clip_text_to_ldm(state, prefix)
        out.pop(next(iter(out)))
        return out

    monkeypatch.setitem(sf.TEXT_ENCODERS, "sd1", (("text_encoder", "cond_stage_model.transformer.", lossy),))
    with pytest.raises(ValueError, match="text_encoder: .* in, .* out"):
        sf.pipeline_to_single_file(_pipe(**tiny_parts), tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_bad_dtype_and_metadata_are_refused(tiny_parts, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        sf.pipeline_to_single_file(_pipe(**tiny_parts), tmp_path / "m.safetensors", dtype=torch.float64)
    with pytest.raises(ValueError, match="metadata"):
        sf.pipeline_to_single_file(_pipe(**tiny_parts), tmp_path / "m.safetensors", metadata={"steps": 3})
    assert not (tmp_path / "m.safetensors").exists()
