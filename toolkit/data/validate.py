"""Hostile-data handling: decode every image and caption under a stated policy, never crash.

Each item either becomes a clean RGB image + caption (possibly *converted*: CMYK, 16-bit,
alpha, palette, grayscale, EXIF orientation, upscaled) or is *rejected* with a reason. The
pre-training scan runs this over the whole dataset (threads + progress bar), caches the result
by dataset fingerprint and policy, and writes a report; the loader runs the same code lazily,
so a file that changes after the scan is skipped and logged rather than crashing an epoch.

Hand-written because neither ``datasets`` nor Pillow has a policy layer: ``datasets.Image``
decoding raises on the first bad file, and Pillow's own conversions drop alpha onto black.
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from toolkit.atomic import atomic_open
from toolkit.logs import progress

log = logging.getLogger(__name__)


# Source problems no caption policy can fix: which caption belongs to which image is unknown, or
# the row names a file outside the dataset (never read).
NEVER_GUESSED = ("duplicate name", "path outside the dataset")
# What a source may say about a row before its image is read ("<reason>" or "<reason> (<detail>)");
# the reason is the report's key, exactly one of these.
CAPTION_REASONS = ("missing caption", "empty caption", "caption not UTF-8", "duplicate name", "no metadata row",
                   "path outside the dataset")


class BadItem(ValueError):
    """An item the policy rejects; ``reason`` is the report's group."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class EmptyDatasetError(ValueError):
    pass


@dataclass(frozen=True)
class DataPolicy:
    """What to do with each kind of problem (the ``data.policy`` config group).

    Args:
        on_error: ``skip`` (count it, report it, go on) or ``error`` (stop at the first bad item,
            naming the file and the problem).
        small_images: an image whose shorter side is below ``min_side``: ``upscale`` or ``skip``.
        min_side: the smallest acceptable shorter side (None: the training resolution).
        captions: missing / empty / undecodable caption: ``skip``, ``empty`` (train it with the
            empty prompt) or ``error``.
        alpha_background: RGB that transparent pixels are composited onto.
        max_image_pixels: refuse images with more pixels (decompression bombs), before decoding;
            None: Pillow's ``Image.MAX_IMAGE_PIXELS`` (89.5 M). Pillow itself refuses anything over
            twice its limit on open, so a larger value is an error here.
        scan: decode everything before training (cached by dataset fingerprint).
        scan_workers: threads of the scan.
    """

    on_error: str = "skip"
    small_images: str = "upscale"
    min_side: int | None = None
    captions: str = "skip"
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    max_image_pixels: int | None = None
    scan: bool = True
    # threads change no result: out of the repr that keys scan caches and reference sets
    scan_workers: int = field(default=4, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key, allowed in (("on_error", ("skip", "error")), ("small_images", ("upscale", "skip")),
                             ("captions", ("skip", "empty", "error"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"data.policy.{key}={getattr(self, key)!r}: expected one of {allowed}")
        object.__setattr__(self, "alpha_background", tuple(int(c) for c in self.alpha_background))
        hard = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
        if self.max_image_pixels and hard and self.max_image_pixels > hard:
            raise ValueError(f"data.policy.max_image_pixels={self.max_image_pixels} is above {hard}, the size Pillow "
                             "refuses to open (2 × PIL.Image.MAX_IMAGE_PIXELS); use at most that")

    def deciding(self) -> dict[str, Any]:
        """The fields that decide which items a scan keeps, and with which captions, besides the
        smallest side (a prepared set records them; training compares them)."""
        return {k: getattr(self, k) for k in ("small_images", "captions", "max_image_pixels")}

    def pixel_limit(self) -> tuple[int | None, str]:
        """The limit in force and where it comes from."""
        if self.max_image_pixels:
            return int(self.max_image_pixels), "data.policy.max_image_pixels"
        return Image.MAX_IMAGE_PIXELS, "Pillow's Image.MAX_IMAGE_PIXELS"


def _open(data: bytes, policy: DataPolicy) -> Image.Image:
    if not data:
        raise BadItem("empty file", "0 bytes")
    limit, source = policy.pixel_limit()
    try:
        with warnings.catch_warnings():   # the size is checked below, against our limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if limit and img.width * img.height > limit:
                raise BadItem("decompression bomb", f"{img.width}x{img.height} = {img.width * img.height:,} pixels "
                              f"> limit {limit:,} ({source})")
            img.load()   # decode now: a truncated file fails here, not mid-epoch
    except Image.DecompressionBombError as err:   # over 2x Pillow's limit: refused inside Image.open
        m = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(m.group(1)):,} pixels" if m else "more pixels"
        raise BadItem("decompression bomb", f"{size} > limit {limit:,} ({source})") from None
    except UnidentifiedImageError:
        raise BadItem("not an image", "Pillow cannot identify the file") from None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, BadItem):
            raise
        raise BadItem("corrupt or truncated image", str(err)) from None
    return img


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> tuple[Image.Image, str | None]:
    """RGB image and what was converted (None: already 8-bit RGB)."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I"):   # 16/32-bit grey: keep the top 8 bits of range
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB"), f"{mode} (alpha on {background})"
    return img.convert("RGB"), mode


def decode_image(item: Any, policy: DataPolicy, min_side: int) -> tuple[Image.Image, list[str]]:
    """A clean RGB image from ``item`` (PIL image, path, or a ``datasets`` ``{path, bytes}``
    dict), and the conversions applied. Raises ``BadItem``."""
    if isinstance(item, Image.Image):
        img = item
        img.load()
    else:
        path, data = (item, None) if isinstance(item, str | Path) else (item.get("path"), item.get("bytes"))
        if data is None:
            try:
                data = Path(path).read_bytes()
            except OSError as err:
                raise BadItem("unreadable file", str(err)) from None
        img = _open(data, policy)
    notes = []
    if img.getexif().get(0x0112, 1) not in (1, None):
        img = ImageOps.exif_transpose(img)
        notes.append("EXIF orientation applied")
    img, converted = to_rgb(img, policy.alpha_background)
    if converted:
        notes.append(f"converted from {converted}")
    w, h = img.size
    if min(w, h) < min_side:
        if policy.small_images == "skip":
            raise BadItem("smaller than the resolution", f"{w}x{h} < {min_side}")
        notes.append(f"upscaled from {w}x{h}")   # the training transform resizes it
    return img, notes


def caption_reason(problem: str) -> tuple[str, str]:
    """(reason, detail) of a source's caption problem ``"<reason> (<detail>)"``."""
    reason = next((r for r in CAPTION_REASONS if problem.startswith(r)), problem)
    return reason, problem[len(reason):].strip().removeprefix("(").removesuffix(")")


def check_caption(caption: Any, problem: str | None, policy: DataPolicy) -> str:
    """The caption to train on; ``problem`` is what the source found (missing, not UTF-8, no
    metadata row...)."""
    if problem is None and caption is None:
        problem = "missing caption"
    if problem is None and not str(caption).strip():
        problem = "empty caption"
    if problem is None:
        return str(caption).strip()
    if policy.captions == "empty" and not problem.startswith(NEVER_GUESSED):
        return ""
    raise BadItem(*caption_reason(problem))


def item_path(item: Any) -> str | None:
    """The file an item was read from (a path, or a ``datasets`` ``{path, bytes}`` dict), if any."""
    path = item.get("path") if isinstance(item, dict) else item if isinstance(item, str | Path) else None
    return str(path) if path else None


def item_name(item: Any, index: int) -> str:
    return item_path(item) or f"row {index}"


@dataclass
class ScanResult:
    """Indices to keep, and the report of what was rejected or converted."""

    keep: list[int]
    total: int
    rejected: list[dict[str, str]] = field(default_factory=list)
    converted: list[dict[str, str]] = field(default_factory=list)
    sizes: list[list[int]] = field(default_factory=list)   # (width, height) of each kept item

    def counts(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rejected))

    def summary(self) -> str:
        groups = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts().items())) or "none"
        return f"{len(self.keep)} of {self.total} items usable; rejected: {groups}"


def scan(n: int, get: Callable[[int], tuple[Any, Any, str | None]], policy: DataPolicy, min_side: int,
         desc: str = "scanning data", rows: range | None = None) -> ScanResult:
    """Check items ``0..n-1`` (or ``rows`` of them); ``get(i)`` returns (image item, caption, caption problem)."""
    rows = range(n) if rows is None else rows

    def one(i: int) -> tuple[int, BadItem | None, list[str], str, list[int]]:
        image, caption, problem = get(i)
        name = item_name(image, i)
        try:
            check_caption(caption, problem, policy)
            img, notes = decode_image(image, policy, min_side)
            return i, None, notes, name, list(img.size)
        except BadItem as bad:
            if policy.on_error == "error":
                raise BadItem(bad.reason, f"{name} ({bad.detail})" if bad.detail else name) from None
            return i, bad, [], name, []

    result = ScanResult(keep=[], total=len(rows))
    with ThreadPoolExecutor(max(1, policy.scan_workers)) as pool:
        for i, bad, notes, name, size in progress(pool.map(one, rows), desc, total=len(rows), unit="items"):
            if bad is None:
                result.keep.append(i)
                result.sizes.append(size)
                if notes:
                    result.converted.append({"item": name, "what": "; ".join(notes)})
            else:   # the reason is the report's key, exactly; the detail says which file / how
                result.rejected.append({"item": name, "reason": bad.reason, "detail": bad.detail})
    return result


def save_scan(result: ScanResult, path: Path) -> None:
    """Atomic JSON write (temp file + rename)."""
    with atomic_open(path, "w") as f:
        json.dump({**asdict(result), "counts": result.counts(), "summary": result.summary()}, f, indent=1)


def load_scan(path: Path) -> ScanResult | None:
    try:
        d = json.loads(path.read_text())
        return ScanResult(d["keep"], d["total"], d["rejected"], d["converted"], d["sizes"])
    except (OSError, ValueError, KeyError):
        return None


def require_items(result: ScanResult, source: str, sizes: Sequence[int] = ()) -> None:
    """Stop (before any model is loaded) when nothing or too little survived the scan."""
    need = max(sizes, default=1)
    if len(result.keep) < need:
        raise EmptyDatasetError(
            f"{source}: {result.summary()} — need at least {need}. Fix or remove the rejected files "
            "(listed in the run dir's data_report_train.json / data_report_val.json), or relax data.policy "
            "(small_images=upscale, captions=empty).")
