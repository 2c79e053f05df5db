"""Procedural imagery for autoencoder training: textures the generated world never shows.

An autoencoder trained only on flat-coloured shapes cannot reconstruct what a later LoRA must
learn (an earlier attempt: MSE 0.12 on striped objects vs 0.004 on plain ones, and the LoRA
learned nothing). So the AE also sees stripes at every angle, period and phase, checkerboards,
gradients, noise and shapes filled with such textures. The held-out style images are never
drawn: angles and periods are continuous draws, not the style set's one pattern.

Images are drawn at ``SUPERSAMPLE``× and box-filtered down, which anti-aliases edges the way
the world's renderer does.
"""

from __future__ import annotations

import multiprocessing

import numpy as np

SUPERSAMPLE = 4
KINDS = ("solid", "gradient", "stripes", "checker", "noise", "blobs", "shape", "split")
# Not in the default draw: "striped_shape" (one stripe-filled shape on a plain background) and
# "striped_ground" (one plain shape on a background of broad two-tone stripes).
ALL_KINDS = (*KINDS, "striped_shape", "striped_ground")


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    return xx / s, yy / s   # in [0, 1): patterns are defined in image-side units


def _two_tone(mask: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return m * a + (1 - m) * b


def stripes(s: int, rng: np.random.Generator, side: int) -> np.ndarray:
    """Square- or sine-wave stripes: any angle (axis and diagonal angles favoured), period
    from 2.5 px to half the image, random phase and duty cycle."""
    xx, yy = _grid(s)
    angle = rng.choice([0, 45, 90, 135]) if rng.random() < 0.4 else rng.uniform(0, 180)
    theta = np.deg2rad(angle)
    period = np.exp(rng.uniform(np.log(2.5), np.log(side / 2))) / side
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 1)
    a, b = _colour(rng), _colour(rng) * (rng.random() < 0.5)   # often colour on near-black
    if rng.random() < 0.75:
        return _two_tone((u % 1) < rng.uniform(0.3, 0.7), a, b)
    w = 0.5 + 0.5 * np.sin(2 * np.pi * u)
    return w[..., None] * a + (1 - w[..., None]) * b


def checker(s: int, rng: np.random.Generator, side: int) -> np.ndarray:
    xx, yy = _grid(s)
    cell = rng.uniform(2, side / 3) / side
    theta = np.deg2rad(rng.choice([0, 45]) if rng.random() < 0.7 else rng.uniform(0, 90))
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / cell
    v = (-xx * np.sin(theta) + yy * np.cos(theta)) / cell
    return _two_tone((np.floor(u) + np.floor(v)) % 2 == 0, _colour(rng), _colour(rng))


def gradient(s: int, rng: np.random.Generator, side: int) -> np.ndarray:
    xx, yy = _grid(s)
    theta = rng.uniform(0, 2 * np.pi)
    t = np.clip(xx * np.cos(theta) + yy * np.sin(theta) - min(0, np.cos(theta)) - min(0, np.sin(theta)),
                0, 1) / (abs(np.cos(theta)) + abs(np.sin(theta)))
    return t[..., None] * _colour(rng) + (1 - t[..., None]) * _colour(rng)


def noise(s: int, rng: np.random.Generator, side: int) -> np.ndarray:
    """Per-pixel (at the output resolution) colour or grey noise around a random colour."""
    amp = rng.uniform(10, 120)
    grey = rng.random() < 0.5
    n = rng.normal(0, amp, (side, side, 1 if grey else 3))
    img = np.clip(_colour(rng) + n, 0, 255)
    return np.repeat(np.repeat(np.broadcast_to(img, (side, side, 3)), s // side, 0), s // side, 1)


def blobs(s: int, rng: np.random.Generator, side: int) -> np.ndarray:
    """Smooth low-frequency colour fields (bilinear upsampling of a coarse random grid)."""
    k = int(rng.integers(2, 7))
    coarse = rng.uniform(0, 255, (k, k, 3))
    pos = np.linspace(0, k - 1, s)
    i0 = np.clip(np.floor(pos).astype(int), 0, k - 2)
    f = (pos - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]       # (s, k, 3)
    cols = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]  # (s, s, 3)
    return cols


def solid(s: int, rng: np.random.Generator, side: int) -> np.ndarray:
    return np.broadcast_to(_colour(rng), (s, s, 3)).copy()


TEXTURES = (solid, gradient, stripes, checker, noise, blobs)
# Fills of shapes and halves: textures weighted towards stripes (what the style set needs).
FILL_WEIGHTS = np.array([2, 1, 4, 2, 1, 1], dtype=float) / 11


def _texture(s: int, rng: np.random.Generator, side: int) -> np.ndarray:
    return TEXTURES[rng.choice(len(TEXTURES), p=FILL_WEIGHTS)](s, rng, side)


def shape_mask(s: int, rng: np.random.Generator) -> np.ndarray:
    """An ellipse, rotated rectangle or random convex-ish polygon at a random place and size."""
    xx, yy = _grid(s)
    cx, cy = rng.uniform(0.15, 0.85, 2)
    r = rng.uniform(0.1, 0.4)
    kind = rng.integers(3)
    if kind == 0:
        ax, ay = r * rng.uniform(0.6, 1.4, 2)
        return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    if kind == 1:
        return (abs(u) <= r * rng.uniform(0.5, 1.2)) & (abs(v) <= r * rng.uniform(0.5, 1.2))
    n = int(rng.integers(3, 7))  # regular polygon as an intersection of half-planes
    ang = np.arctan2(v, u)
    sector = np.pi / n
    d = np.hypot(u, v) * np.cos((ang % (2 * sector)) - sector)
    return d <= r * np.cos(sector)


def fine_stripes(s: int, rng: np.random.Generator, side: int) -> np.ndarray:
    """Thin stripes (2-8 px period), mostly diagonal, colour on near-black at a random phase."""
    xx, yy = _grid(s)
    theta = np.deg2rad(rng.choice([45, 135]) if rng.random() < 0.7 else rng.uniform(0, 180))
    period = rng.uniform(2.0, 8.0) / side
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 1)
    dark = rng.uniform(0, 100, 3) if rng.random() < 0.3 else np.full(3, rng.uniform(0, 40))
    return _two_tone((u % 1) < 0.5, _colour(rng), dark)


def broad_stripes(s: int, rng: np.random.Generator, side: int) -> np.ndarray:
    """Broad stripes (4-12 px period) at any angle, in a colour and a darker or lighter shade."""
    xx, yy = _grid(s)
    theta = np.deg2rad(rng.choice([45, 135]) if rng.random() < 0.5 else rng.uniform(0, 180))
    period = rng.uniform(4.0, 12.0) / side
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 1)
    a = _colour(rng)
    b = a * rng.uniform(0.3, 0.7) if rng.random() < 0.5 else a + (255 - a) * rng.uniform(0.2, 0.5)
    return _two_tone((u % 1) < 0.5, a, b)


def pattern_image(rng: np.random.Generator, side: int = 32, kinds: tuple[str, ...] = KINDS
                  ) -> np.ndarray:
    """One ``side``² uint8 RGB image of a kind drawn uniformly from ``kinds`` (repeat a name to
    weight it; see ``ALL_KINDS``)."""
    s = side * SUPERSAMPLE
    kind = kinds[rng.integers(len(kinds))]
    if kind == "striped_shape":
        img = _two_tone(shape_mask(s, rng), fine_stripes(s, rng, side), solid(s, rng, side))
    elif kind == "striped_ground":
        img = _two_tone(shape_mask(s, rng), solid(s, rng, side), broad_stripes(s, rng, side))
    elif kind == "shape":   # 1-3 textured shapes on a textured or plain background
        img = _texture(s, rng, side) if rng.random() < 0.5 else solid(s, rng, side)
        for _ in range(int(rng.integers(1, 4))):
            img = _two_tone(shape_mask(s, rng), _texture(s, rng, side), img)
    elif kind == "split":  # two textures meeting at a random straight edge
        xx, yy = _grid(s)
        theta = rng.uniform(0, 2 * np.pi)
        edge = (xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta) < rng.uniform(-0.3, 0.3)
        img = _two_tone(edge, _texture(s, rng, side), _texture(s, rng, side))
    else:
        img = {f.__name__: f for f in TEXTURES}[kind](s, rng, side)
    img = img.reshape(side, SUPERSAMPLE, side, SUPERSAMPLE, 3).mean((1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _one_pattern(args: tuple[int, int, int, tuple[str, ...]]) -> np.ndarray:
    seed, i, side, kinds = args
    return pattern_image(np.random.default_rng([seed, i]), side, kinds)


def pattern_bank(n: int, seed: int, side: int = 32, kinds: tuple[str, ...] = KINDS,
                 workers: int = 1) -> np.ndarray:
    """``n`` procedural images, ``(n, side, side, 3)`` uint8. Image ``i`` is drawn from its own
    generator seeded with ``(seed, i)``, so the bank is the same for any number of ``workers``."""
    if n == 0:
        return np.zeros((0, side, side, 3), np.uint8)
    jobs = [(seed, i, side, tuple(kinds)) for i in range(n)]
    if workers <= 1:
        return np.stack([_one_pattern(j) for j in jobs])
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return np.stack(pool.map(_one_pattern, jobs, chunksize=64))
