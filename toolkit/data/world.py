"""A generated captioned world: coloured shapes with controllable attributes.

Every image is drawn from (shape, colour, size, position, background) and its caption is built
from the same draw: "a small red circle in the top left on a dark blue background". The
``style`` set adds a look the base set never shows (objects filled with thick diagonal
stripes), bound to the caption phrase "striped".

    python data/make_world.py            # writes data/world/{base,style}/{train,test}
"""

from __future__ import annotations

import json
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
        noun = f"{STYLE_PHRASE} {self.shape}" if self.striped else self.shape
        return f"a {self.size} {self.colour} {noun} {WHERE[self.position]} on a {self.background} background"


def draw_scene(rng: np.random.Generator, striped: bool) -> Scene:
    pick = lambda xs: list(xs)[int(rng.integers(len(xs)))]
    colour = pick(COLOURS)
    background = pick(BACKGROUNDS)
    return Scene(pick(SHAPES), colour, pick(SIZES), pick(POSITIONS), background, striped)


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
    mask = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(mask)
    cx, cy = (v * s for v in POSITIONS[scene.position])
    r = SIZES[scene.size] * s / 2
    if scene.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        d.polygon(_polygon(scene.shape, cx, cy, r), fill=255)
    fill = Image.new("RGB", (s, s), COLOURS[scene.colour])
    if scene.striped:
        # Thick diagonal stripes (period 1/8 of the side): colour alternating with near-black.
        yy, xx = np.mgrid[0:s, 0:s]
        band = ((xx + yy) // (s // 16)) % 2 == 1
        arr = np.array(fill)
        arr[band] = (20, 20, 20) if scene.colour != "white" else (90, 90, 90)
        fill = Image.fromarray(arr)
    img.paste(fill, (0, 0), mask)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def generate(out_dir: str | Path, n: int, seed: int, striped: bool = False, size: int = 64) -> Path:
    """Write ``n`` images and ``metadata.jsonl`` (imagefolder layout) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        scene = draw_scene(rng, striped)
        name = f"{i:05d}.png"
        render(scene, size).save(out / name, optimize=True)
        rows.append({"file_name": name, "text": scene.caption(), **asdict(scene)})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# The shipped splits: (subdir, n, seed, striped). Seeds differ so no split repeats another.
SPLITS = {"base/train": (20000, 1, False), "base/test": (1000, 2, False),
          "style/train": (400, 3, True), "style/test": (1000, 4, True)}


def generate_all(root: str | Path, size: int = 64, only: tuple[str, ...] | None = None) -> None:
    for name, (n, seed, striped) in SPLITS.items():
        if only is None or name in only:
            generate(Path(root) / name, n, seed, striped, size)
