"""A generated captioned world: coloured shapes with controllable attributes.

Every image is drawn from (shape, colour, size, position, background) and its caption is built
from the same draw: "a small red circle in the top left on a dark blue background". The
``style`` set adds a look the base set never shows (the background painted with broad diagonal
stripes in two tones of its colour), bound to the caption phrase "striped": "... on a striped
dark blue background".

    python data/make_world.py            # writes data/world/{base,style}/{train,test}
"""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
           "yellow": (240, 210, 40), "purple": (150, 60, 200), "orange": (245, 140, 30),
           "white": (245, 245, 245), "pink": (245, 130, 190)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "dark blue": (20, 30, 90),
               "light blue": (150, 200, 240), "beige": (225, 210, 170), "dark green": (20, 70, 35)}
SIZES = {"small": 0.22, "medium": 0.36, "large": 0.52}   # object diameter / image side
POSITIONS = {"top left": (0.27, 0.27), "top": (0.5, 0.27), "top right": (0.73, 0.27),
             "left": (0.27, 0.5), "center": (0.5, 0.5), "right": (0.73, 0.5),
             "bottom left": (0.27, 0.73), "bottom": (0.5, 0.73), "bottom right": (0.73, 0.73)}
WHERE = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
         "left": "on the left", "center": "in the center", "right": "on the right",
         "bottom left": "in the bottom left", "bottom": "at the bottom",
         "bottom right": "in the bottom right"}
STYLE_PHRASE = "striped"


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    striped: bool = False

    def caption(self) -> str:
        ground = f"{STYLE_PHRASE} {self.background}" if self.striped else self.background
        return f"a {self.size} {self.colour} {self.shape} {WHERE[self.position]} on a {ground} background"


def draw_scene(rng: np.random.Generator, striped: bool) -> Scene:
    pick = lambda xs: list(xs)[int(rng.integers(len(xs)))]
    colour = pick(COLOURS)
    background = pick(BACKGROUNDS)
    return Scene(pick(SHAPES), colour, pick(SIZES), pick(POSITIONS), background, striped)


def stripe_tone(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The second tone of a striped background: darker for light colours, lighter for dark."""
    if sum(rgb) / 3 > 100:
        return tuple(int(c * 0.5) for c in rgb)
    return tuple(int(c + (255 - c) * 0.35) for c in rgb)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    w = r / 2.6  # cross: 12-gon
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w)]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene at ``size``² (4× supersampled, then downsampled for clean edges)."""
    s = 4 * size
    img = Image.new("RGB", (s, s), BACKGROUNDS[scene.background])
    if scene.striped:
        # Broad diagonal stripes (band = 1/6 of the side along x+y: ~7.5 px period at 32 px,
        # coarse enough for a factor-4 autoencoder) of the background and a shade of it.
        yy, xx = np.mgrid[0:s, 0:s]
        arr = np.array(img)
        arr[((xx + yy) // (s // 6)) % 2 == 1] = stripe_tone(BACKGROUNDS[scene.background])
        img = Image.fromarray(arr)
    mask = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(mask)
    cx, cy = (v * s for v in POSITIONS[scene.position])
    r = SIZES[scene.size] * s / 2
    if scene.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        d.polygon(_polygon(scene.shape, cx, cy, r), fill=255)
    fill = Image.new("RGB", (s, s), COLOURS[scene.colour])
    img.paste(fill, (0, 0), mask)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _write(job: tuple[Scene, Path, int]) -> None:
    scene, path, size = job
    render(scene, size).save(path, optimize=True)


def generate(out_dir: str | Path, n: int, seed: int, striped: bool = False, size: int = 64,
             workers: int = 1) -> Path:
    """Write ``n`` images and ``metadata.jsonl`` (imagefolder layout) to ``out_dir``.

    Scenes are drawn in order from one seeded generator, then rendered (in ``workers``
    processes): the files do not depend on the number of workers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenes = [draw_scene(rng, striped) for _ in range(n)]
    jobs = [(scene, out / f"{i:05d}.png", size) for i, scene in enumerate(scenes)]
    if workers <= 1:
        for job in jobs:
            _write(job)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_write, jobs, chunksize=64)
    rows = [{"file_name": path.name, "text": scene.caption(), **asdict(scene)} for scene, path, _ in jobs]
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# The shipped splits: (subdir, n, seed, striped). Seeds differ so no split repeats another.
SPLITS = {"base/train": (20000, 1, False), "base/test": (1000, 2, False),
          "style/train": (400, 3, True), "style/test": (1000, 4, True)}


def generate_all(root: str | Path, size: int = 64, only: tuple[str, ...] | None = None,
                 workers: int = 1) -> None:
    for name, (n, seed, striped) in SPLITS.items():
        if only is None or name in only:
            generate(Path(root) / name, n, seed, striped, size, workers)
