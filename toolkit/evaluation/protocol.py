"""What must be recorded beside a result to reproduce it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from toolkit.config import as_list
from toolkit.run.identity import versions  # noqa: F401 - recorded with every row (the one definition)

METRIC_IMPL = {"fid": "Fréchet distance, Tr((Σ₁Σ₂)^½) from a symmetric eigendecomposition (float64)",
               "kid": "unbiased MMD², kernel (xᵀy/d+1)³, over all real × generated pairs",
               "ci": "grouped jackknife over generated images, reference fixed (FID, KID); Student t over "
                     "images (CLIP); toolkit/metrics/intervals.py",
               "prdc": "precision/recall (k=3, Kynkäänniemi 2019), density/coverage (k=5, Naeem 2020)",
               "vendi": "Vendi score (Friedman & Dieng 2023): exp entropy of the eigenvalues of XXᵀ/n, linear kernel "
                        "on L2-normalised generated Inception features (the vendi-score package's score_X)"}


PROMPT_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl", ".lst", ".prompts")


def looks_like_path(text: str) -> bool:
    """A value meant as a file name rather than a prompt: it starts like a path (``/``, ``./``,
    ``../``, ``~``), or it is one word holding a path separator or ending in a text-file suffix.
    Prompts are words with spaces: ``a cat w/ a hat`` is a prompt, ``prompts.txt`` a file."""
    t = text.strip()
    if t.startswith(("/", "./", "../", "~", ".\\")):
        return True
    return not any(c.isspace() for c in t) and ("/" in t or "\\" in t or t.lower().endswith(PROMPT_FILE_SUFFIXES))


def read_prompts(prompts: str | Sequence[str], key: str = "sample.prompts") -> list[str]:
    """A list of prompts, or the path of a text file with one prompt per line. A single value
    that looks like a path (``looks_like_path``) must be an existing ``.txt``-style file: a typo
    in a file name is an error, never a prompt made of the file name."""
    items = as_list(prompts)
    if len(items) == 1:
        path = Path(str(items[0])).expanduser()
        if path.is_file():
            if path.suffix.lower() in (".csv", ".tsv", ".json", ".jsonl"):
                raise ValueError(f"{key}={str(items[0])!r} is a {path.suffix} file; prompts are read from a plain text "
                                 "file, one prompt per line (a .csv/.json file would be read as raw lines)")
            lines = path.read_text(encoding="utf-8").splitlines()
            items = [ln.strip() for ln in lines if ln.strip()]
        elif looks_like_path(str(items[0])):
            raise FileNotFoundError(
                f"{key}={str(items[0])!r} looks like a file name, but there is no such file (resolved to "
                f"{path.resolve()}). Pass an existing text file (one prompt per line) or a list of prompts: "
                f"'{key}=[a red circle, a blue square]'")
    if not items:
        raise ValueError("no prompts given (sample.prompts: a list or a text file, one per line)")
    return [str(p) for p in items]
