import math

import pytest
import torch
from diffusers import DDPMScheduler

from toolkit.models import objectives


def sched(kind: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, prediction_type=kind)


def test_timesteps_stay_in_range():
    t = objectives.sample_timesteps(5000, 1000, 200, 400, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 200 and t.max() < 400 and t.dtype == torch.long
    assert len(t.unique()) > 150  # uniform over the range, not a constant
    with pytest.raises(ValueError, match="timestep range"):
        objectives.sample_timesteps(4, 1000, 500, 100)


def test_epsilon_target_is_the_noise():
    lat, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 500, 999])
    assert torch.equal(objectives.training_target(sched(), lat, noise, t), noise)


def test_v_target_matches_formula():
    s = sched("v_prediction")
    lat, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 500, 999])
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    expect = a.sqrt() * noise - (1 - a).sqrt() * lat
    torch.testing.assert_close(objectives.training_target(s, lat, noise, t), expect)
    with pytest.raises(ValueError, match="prediction_type"):
        objectives.training_target(sched("sample"), lat, noise, t)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights(kind):
    s = sched(kind)
    t = torch.tensor([10, 500, 990])
    a = s.alphas_cumprod[t]
    snr = a / (1 - a)
    w = objectives.min_snr_weights(s, t, gamma=5.0)
    denom = snr + 1 if kind == "v_prediction" else snr
    torch.testing.assert_close(w, torch.clamp(snr, max=5.0) / denom)
    assert w[0] < 1 and (kind == "v_prediction" or math.isclose(w[2].item(), 1.0, rel_tol=1e-5))
    assert objectives.min_snr_weights(s, t, None) is None


def test_weighted_mse():
    pred, target = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    assert objectives.weighted_mse(pred, target).item() == pytest.approx(2.5)
    assert objectives.weighted_mse(pred, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)


def test_noise_offset_is_a_per_channel_constant():
    noise = torch.zeros(2, 4, 8, 8)
    out = objectives.offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    assert torch.all(out.amax((2, 3)) == out.amin((2, 3)))  # constant over space
    assert out.abs().sum() > 0
    assert objectives.offset_noise(noise, 0.0) is noise


def test_caption_dropout_rate():
    caps = ["x"] * 4000
    out = objectives.drop_captions(caps, 0.25, torch.Generator().manual_seed(0))
    assert set(out) == {"x", ""}
    assert out.count("") / len(out) == pytest.approx(0.25, abs=0.03)
    assert objectives.drop_captions(caps, 0.0) == caps
