"""A quantized frozen base (model.quantize): int8 through torchao on CPU trains, resumes bit for bit,
and exports exactly the adapter an unquantized run exports, which stock diffusers loads into the
unquantized base; NF4 through bitsandbytes runs on this CPU; what cannot run is refused."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from tests.conftest import compose_cfg, tiny_overrides
from toolkit.adapters.loading import read_for, verify_loaded
from toolkit.models import quantize
from toolkit.models.families import SD
from toolkit.models.pretrained import load_components
from toolkit.tasks import train

pytest.importorskip("torchao", reason="model.quantize needs the quantize extra: pip install -e '.[quantize]'")
ADAPTER = "adapter/pytorch_lora_weights.safetensors"


def run(model, data, out, *extra):
    return train.run(compose_cfg(tiny_overrides(model, data, out) + ["module.objective.caption_dropout=0", *extra],
                                 out))


@pytest.fixture(scope="module")
def int8_run(tiny_model, imagefolder_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "run"
    run(tiny_model, imagefolder_data, out, "model.quantize=int8")
    return out


def test_int8_weights_are_what_the_plan_counts_and_a_quarter_of_float32(tiny_model):
    q = load_components(tiny_model, quantize="int8").denoiser
    full = load_components(tiny_model).denoiser
    linears = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m.weight).__name__ == "Int8Tensor" for m in linears)
    measured = sum(quantize.tensor_bytes(t) for t in (*q.parameters(), *q.buffers()))
    assert measured == quantize.quantized_bytes(full, "int8", torch.float32)   # the plan's arithmetic, exactly
    lin_q = sum(quantize.tensor_bytes(m.weight) for m in linears)
    lin_f = sum(m.weight.numel() * 4 for m in full.modules() if isinstance(m, torch.nn.Linear))
    assert lin_q < 0.3 * lin_f   # 1 byte a weight + a scale and zero point per row, against 4 bytes
    # the int8 UNet computes the float32 UNet's output to its rounding (diffusers warns that only
    # bf16 is tested with integer weights: this is the check that float32 is right)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        a, b = q(x, t, ctx).sample, full(x, t, ctx).sample
    assert (a - b).norm() / b.norm() < 0.02


def test_int8_base_trains_resumes_bit_identically_and_exports_the_unquantized_adapter(
        int8_run, tiny_model, imagefolder_data, tmp_path):
    # resumed from the int8 run's step-2 checkpoint in a new run dir: the same adapter, bit for bit
    resumed = tmp_path / "resumed"
    run(tiny_model, imagefolder_data, resumed, "model.quantize=int8",
        f"ckpt_path='{int8_run}/checkpoints/step=2.ckpt'")
    a, b = load_file(int8_run / ADAPTER), load_file(resumed / ADAPTER)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # it trained (the B factors left zero) in float32 on top of int8 weights
    assert all(v.dtype == torch.float32 for v in a.values()) and any(v.abs().sum() > 0 for k, v in a.items()
                                                                      if "lora_B" in k or "lora.up" in k)
    # an unquantized run writes exactly these keys and shapes
    plain = tmp_path / "plain"
    run(tiny_model, imagefolder_data, plain, "trainer.max_steps=2")
    c = load_file(plain / ADAPTER)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in c.items()}
    # stock diffusers loads it into the unquantized base: every layer arrives with the file's update
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(int8_run / "adapter"), adapter_name="int8")
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    counts = verify_loaded({"unet": pipe.unet}, "int8", read_for(int8_run / ADAPTER, models, SD), tol=1e-6)
    assert counts["unet"] == len(a) // 2   # A and B per layer


def test_nf4_is_refused_off_cuda_for_the_reason_it_gives(tiny_model):
    """bitsandbytes runs a 4-bit layer on this CPU, but diffusers' loader (the one that quantizes
    while reading) refuses without a GPU: the toolkit says so before loading anything."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 8, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(8, 64), requires_grad=False, quant_type="nf4")
    out = layer.to("cpu")(torch.ones(1, 64))
    assert layer.weight.dtype == torch.uint8 and torch.isfinite(out).all()   # 4-bit on the CPU: yes
    from diffusers import BitsAndBytesConfig, UNet2DConditionModel

    with pytest.raises(RuntimeError, match="No GPU found"):   # the loader: no
        UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet",
                                             quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    with pytest.raises(ValueError, match="nf4 needs a CUDA GPU: diffusers' bitsandbytes loader"):
        load_components(tiny_model, quantize="nf4")


def test_what_cannot_run_is_refused_before_loading(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="fp8 needs a GPU with fp8 tensor cores"):
        quantize.check("fp8", "cpu")
    with pytest.raises(ValueError, match="expected null, int8, fp8 or nf4"):
        quantize.check("int4", "cpu")
    with pytest.raises(ValueError, match="single-file checkpoint"):
        quantize.check("int8", "cpu", single_file=True)
    from toolkit.inference.pipeline import load_pipeline

    with pytest.raises(ValueError, match="fuse_adapters=true with model.quantize=int8"):
        load_pipeline(tiny_model, quantize="int8", adapters=[str(tmp_path)], fuse_adapters=True)
