"""Captioned image datasets from three sources, all as HF ``datasets.Dataset``.

1. a hub dataset id (``lambdalabs/naruto-blip-captions``) with configurable columns;
2. a local folder with ``metadata.jsonl`` / ``metadata.csv`` (the ``imagefolder`` convention);
3. a local folder of images with same-name ``.txt`` caption files (the kohya convention).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import datasets

from toolkit.data.names import outside_dataset
from toolkit.locate import check_local_or_hub

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def detect_format(path: str | Path) -> str:
    """``imagefolder``, ``sidecar`` (kohya .txt captions) or ``hub``."""
    p = Path(path).expanduser()
    if not p.exists():
        return check_local_or_hub(str(path), "data.path", "dataset")
    if not p.is_dir():
        raise NotADirectoryError(f"dataset path {path!r} is a file; pass its folder or a hub id")
    if any(next(p.glob(f"**/{m}"), None) for m in METADATA_FILES):
        return "imagefolder"
    return "sidecar"


def image_files(root: Path) -> list[Path]:
    return sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())


# Column the local sources add: why a row is unusable before its image is read (its caption, or
# the row itself: a duplicate name, no metadata row, a path outside the dataset).
CAPTION_PROBLEM = "caption_problem"
NO_METADATA_ROW = "no metadata row"
PATH_OUTSIDE = "path outside the dataset"


def read_sidecar_caption(txt: Path) -> tuple[str | None, str | None]:
    """(caption, problem) of a kohya ``.txt`` caption file."""
    if not txt.is_file():
        return None, "missing caption"
    try:
        return txt.read_bytes().decode("utf-8").strip(), None
    except UnicodeDecodeError as err:
        return None, f"caption not UTF-8 ({txt.name}: {err.reason} at byte {err.start})"


def sidecar_dataset(root: Path, caption_column: str) -> datasets.Dataset:
    """Images with same-name ``.txt`` captions. Problems are kept as rows with a reason in
    ``caption_problem`` (the scan reports them); nothing is dropped silently here."""
    files = image_files(root)
    stems = Counter(f.with_suffix("") for f in files)
    images, captions, problems = [], [], []
    for img in files:
        if stems[img.with_suffix("")] > 1:
            others = sorted(f.name for f in files if f.with_suffix("") == img.with_suffix(""))
            caption, problem = None, f"duplicate name ({' / '.join(others)} share one caption file)"
        else:
            caption, problem = read_sidecar_caption(img.with_suffix(".txt"))
        images.append(str(img))
        captions.append(caption)
        problems.append(problem)
    if not images:
        raise ValueError(f"{root}: found no image files ({', '.join(sorted(IMAGE_EXTS))})")
    return datasets.Dataset.from_dict({"image": images, caption_column: captions, CAPTION_PROBLEM: problems})


def load_captioned(path: str, split: str = "train", image_column: str = "image",
                   caption_column: str = "text", revision: str | None = None, local: str | None = None
                   ) -> datasets.Dataset:
    """Load one split and check that its image and caption columns exist.

    Args:
        path: hub dataset id or local folder (imagefolder or sidecar layout).
        split: split to read (hub and imagefolder sources).
        image_column: name of the image column.
        caption_column: name of the caption column.
        revision: hub revision.
        local: where a prepared dataset's shards are fetched to (``toolkit.data.prepared``).
    """
    from toolkit.data.prepared import PreparedDataset, is_prepared

    if is_prepared(path):   # task=prepare's shards, in a folder or on S3
        if local is None:
            raise ValueError(f"{path} is a prepared dataset: its shards need a node-local folder to be fetched to "
                             "(data.local; the configs set it to <paths.cache_dir>/prepared)")
        return PreparedDataset(str(path), image_column, caption_column, local)
    fmt = detect_format(path)
    if fmt == "sidecar":
        ds = sidecar_dataset(Path(path).expanduser(), caption_column)
    elif fmt == "imagefolder":
        ds = imagefolder_dataset(Path(path).expanduser(), split, image_column, caption_column)
    else:
        ds = datasets.load_dataset(path, split=split, revision=revision)
    for role, col in (("image_column", image_column), ("caption_column", caption_column)):
        if col not in ds.column_names:
            raise KeyError(f"data.{role}={col!r} is not a column of {path!r}; "
                           f"its columns are {ds.column_names}")
    if isinstance(ds.features.get(image_column), datasets.Image):
        # Decode ourselves (toolkit.data.validate): datasets' decoder raises on the first bad file.
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def imagefolder_dataset(root: Path, split: str, image_column: str, caption_column: str) -> datasets.Dataset:
    """``datasets``' imagefolder, plus a row for every image file of the split that no metadata
    row names (``datasets`` drops those without a word): caption None, ``caption_problem`` "no
    metadata row"; and a row for every metadata row naming a file outside the dataset's folder
    (``datasets`` would stop on the first): ``caption_problem`` "path outside the dataset", its
    image never read (the row keeps the name as written, for the report, and empty bytes, which
    every reader takes before a path; the scan rejects it before decoding)."""
    builder = datasets.load_dataset_builder("imagefolder", data_dir=str(root))
    files = next((v for k, v in (builder.config.data_files or {}).items() if str(k) == split), [])
    outside = outside_rows([Path(f) for f in map(str, files) if Path(f).name in METADATA_FILES])
    if outside:   # left out of datasets' read (it refuses the whole set), added back below as rejections
        import pyarrow.dataset as pds

        keep = None
        for col in sorted({c for _, c, _, _ in outside}):
            names = sorted({n for _, c, n, _ in outside if c == col})
            cond = pds.field(col).is_null() | ~pds.field(col).isin(names)
            keep = cond if keep is None else keep & cond
        builder = datasets.load_dataset_builder("imagefolder", data_dir=str(root), filters=keep)
    builder.download_and_prepare()
    ds = builder.as_dataset(split=split)
    if image_column not in ds.column_names or caption_column not in ds.column_names:
        return ds   # load_captioned names the missing column
    ds = ds.cast_column(image_column, datasets.Image(decode=False))
    listed = {str(Path(item["path"]).resolve()) for item in ds[image_column] if item.get("path")}
    orphans = sorted(f for f in map(str, files)
                     if Path(f).suffix.lower() in IMAGE_EXTS and str(Path(f).resolve()) not in listed)
    problems = datasets.Value("string")
    ds = ds.add_column(CAPTION_PROBLEM, [None] * len(ds), feature=problems)
    if orphans:
        log.warning("%s: %d image file(s) have no row in the metadata file (first: %s); reported as %r",
                    root, len(orphans), Path(orphans[0]).name, NO_METADATA_ROW)
    extra = {c: [None] * (len(orphans) + len(outside)) for c in ds.column_names}
    extra[image_column] = [{"path": f, "bytes": None} for f in orphans] + [
        {"path": name, "bytes": b""} for _, _, name, _ in outside]
    extra[CAPTION_PROBLEM] = [NO_METADATA_ROW] * len(orphans) + [
        f"{PATH_OUTSIDE} ({meta.name} line {line} names {name!r})" for meta, _, name, line in outside]
    if outside:
        log.warning("%s: %d metadata row(s) name a file outside the dataset (first: %r); reported as %r", root,
                    len(outside), outside[0][2], PATH_OUTSIDE)
    if not orphans and not outside:
        return ds
    return datasets.concatenate_datasets([ds, datasets.Dataset.from_dict(extra, features=ds.features)])


def outside_rows(metadata: list[Path]) -> list[tuple[Path, str, str, int]]:
    """(metadata file, column, file name, line) of every row of ``metadata`` (``metadata.jsonl`` /
    ``.csv``) whose ``file_name`` (or ``<column>_file_name``) names a file outside its folder."""
    import pandas as pd

    found = []
    for meta in metadata:
        if meta.suffix == ".jsonl":
            with open(meta, encoding="utf-8", errors="replace") as f:
                for line, text in enumerate(f, 1):
                    if not any(t in text for t in ("..", '"/', "\\", "://")):   # cannot name one: skip the parse
                        continue
                    try:
                        row = json.loads(text)
                    except ValueError:
                        continue   # datasets reports a malformed line itself
                    found += [(meta, k, v, line) for k, v in (row.items() if isinstance(row, dict) else ())
                              if is_file_column(k) and outside_dataset(v)]
        else:
            for chunk in pd.read_csv(meta, dtype=str, chunksize=100_000, usecols=is_file_column):
                for col in chunk.columns:
                    found += [(meta, col, v, i + 2) for i, v in chunk[col].items() if outside_dataset(v)]
    return found


def is_file_column(name: str) -> bool:
    return name == "file_name" or name.endswith("_file_name")


def fingerprint_listing(root: str | Path) -> str:
    """Cheap identity of a local folder: every file's relative path, size and mtime."""
    h = hashlib.sha256()
    root = Path(root)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def fingerprint_files(root: str | Path) -> str:
    """Hash of every file's relative path, size and content under ``root`` (dataset identity)."""
    h = hashlib.sha256()
    root = Path(root)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def split_train_val(path: str, split: str, validation_split: str | None, val_fraction: float, seed: int,
                    image_column: str, caption_column: str, revision: str | None = None, local: str | None = None
                    ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training rows and the held-out rows (``validation_split``, else a seeded
    ``val_fraction`` of ``split``, else none): the one definition the datamodule trains on and
    ``eval.dataset=held_out`` evaluates against."""
    kw = {"image_column": image_column, "caption_column": caption_column, "revision": revision, "local": local}
    train = load_captioned(path, split=split, **kw)
    if validation_split:
        return train, load_captioned(path, split=validation_split, **kw)
    if val_fraction > 0:
        parts = train.train_test_split(test_size=val_fraction, seed=seed)
        return parts["train"], parts["test"]
    return train, None


def held_out(path: str, split: str, validation_split: str | None, val_fraction: float, seed: int,
             image_column: str, caption_column: str, revision: str | None = None, local: str | None = None
             ) -> datasets.Dataset | list:
    """The rows of ``path`` that training does not see (empty when it holds none out)."""
    _, val = split_train_val(path, split, validation_split, val_fraction, seed, image_column, caption_column,
                             revision, local)
    return val if val is not None else []


def image_bytes(item: Any) -> bytes:
    if isinstance(item, dict):   # bytes when given (a prepared sample; b"" for a row whose path is refused)
        return item["bytes"] if item.get("bytes") is not None else Path(item["path"]).read_bytes()
    if isinstance(item, str | Path):
        return Path(item).read_bytes()
    return item.tobytes()   # an already-decoded PIL image (some hub datasets)
