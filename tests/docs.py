"""The commands the docs show, read out of the Markdown (``tests/test_docs.py`` checks each).

A documented command is a ``python run.py …`` / ``toolkit …`` line in a shell block of the README
or a ``docs/`` page (backslash continuations joined; under ``srun``, ``torchrun … run.py`` and
environment assignments alike), or a whole ``python run.py …`` code span in a README table row.
The comment lines right under a command in its block are its documented output: ``chosen
<key>=<value>: …`` lines and a ``config error: …`` are checked against what the entry prints.
A trailing ``# runs: embedded`` marks a command that the test runs for real (under
``debug=fast``) on the embedded model.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

SHELLS = ("bash", "sh", "shell", "console")
RUNS = re.compile(r"#\s*runs:\s*embedded\b")


@dataclass
class DocCommand:
    file: str          # relative to the checkout
    line: int          # 1-based, of the command's first line
    text: str          # the command as written (continuations joined)
    args: list[str]    # what follows run.py / toolkit
    runs: bool = False
    expected: list[str] = field(default_factory=list)   # the documented output lines under it

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for no, text in lines:
        if pending is not None:
            no, text = pending[0], pending[1] + " " + text.strip()
        if text.rstrip().endswith("\\"):
            pending = (no, text.rstrip()[:-1].rstrip())
            continue
        pending = None
        out.append((no, text))
    if pending is not None:
        out.append(pending)
    return out


def entry_args(text: str) -> list[str] | None:
    """The arguments of the toolkit's entry in one shell line, or None if it runs something else."""
    spans = re.findall(r"<[^<>]*>", text)   # placeholders may hold spaces: one word each
    for k, span in enumerate(spans):
        text = text.replace(span, f"@PLACEHOLDER{k}@", 1)
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        return None
    for k, span in enumerate(spans):
        tokens = [tok.replace(f"@PLACEHOLDER{k}@", span) for tok in tokens]
    i = 0
    while i < len(tokens) and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[i]) or tokens[i] in ("export", "env")):
        i += 1   # VAR=value before the command
    rest = tokens[i:]
    for j, tok in enumerate(rest):
        if tok.endswith("run.py") and (j == 0 or rest[j - 1] in ("python", "python3") or rest[0] in ("torchrun",
                                                                                                     "srun")):
            return rest[j + 1:]
        if tok == "toolkit" and (j == 0 or rest[j - 1] in ("-m", "srun")):
            return rest[j + 1:]
    return None


def shell_blocks(text: str) -> list[list[tuple[int, str]]]:
    """The lines (numbered) of each fenced shell block."""
    blocks: list[list[tuple[int, str]]] = []
    lang, lines = None, []
    for no, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*```\s*(\S*)", line)
        if m and lang is None:
            lang, lines = m.group(1) or "-", []
        elif m:
            if lang in SHELLS:
                blocks.append(lines)
            lang = None
        elif lang is not None:
            lines.append((no, line))
    return blocks


def commands_in(path: Path, root: Path) -> list[DocCommand]:
    text = path.read_text()
    rel = str(path.relative_to(root))
    out: list[DocCommand] = []
    for block in shell_blocks(text):
        lines = join_continuations(block)
        for k, (no, line) in enumerate(lines):
            args = entry_args(line)
            if args is None:
                continue
            expected = []
            for _, nxt in lines[k + 1:]:
                if not nxt.lstrip().startswith("#") or entry_args(nxt) is not None:
                    break
                expected.append(nxt.lstrip()[1:].strip())
            out.append(DocCommand(rel, no, line.strip(), args, bool(RUNS.search(line)), expected))
    for no, line in enumerate(text.splitlines(), 1):   # a table row's command: `python run.py …`
        if not line.lstrip().startswith("|"):
            continue
        for span in re.findall(r"`(python run\.py[^`]*)`", line.replace("\\|", "|")):
            if "…" in span or "..." in span:
                continue   # a fragment, not a command
            args = entry_args(span)
            if args is not None:
                out.append(DocCommand(rel, no, span, args))
    return out


def documented_commands(root: Path) -> list[DocCommand]:
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [c for p in pages for c in commands_in(p, root)]


LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"`((?:conf|toolkit|tests|bench|data|examples|miniature)/[^`\s]*)`")


def expand_braces(path: str) -> list[str]:
    m = re.search(r"\{([^{}]+)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",") for q in expand_braces(path[:m.start()] + alt + path[m.end():])]


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors of a Markdown page."""
    out = set()
    for line in text.splitlines():
        m = re.match(r"^#{1,6}\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out
