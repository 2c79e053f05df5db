"""The package's rooms and the direction of their imports (README "Where things are").

Every import inside ``toolkit`` (module level or in a function) must point from a higher room to
a lower one, or stay in its own room; nothing imports a task; the package never imports the
miniature's factory (``miniature/``) or the tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

from toolkit.config import PACKAGE

# Lower rank = lower room. Rooms of one rank do not import each other.
RANKS = {
    "atomic": 0, "logs": 0, "locate": 0, "config": 0, "hashing": 0, "results": 0, "reproducibility": 0, "conf": 0,
    "data": 1, "metrics": 1, "models": 1, "run": 1,
    "adapters": 2,
    "inference": 3,
    "evaluation": 4, "training": 4,
    "callbacks": 5, "report": 5,
    "tasks": 6, "model_defaults": 6,
    "cli": 7, "__main__": 8,
}


def room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def imports(path: Path) -> list[tuple[str, int]]:
    """Every toolkit (and miniature/tests) module imported by ``path``, with its line."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out += [(n, node.lineno) for n in names[:1]]
            if node.module == "toolkit":   # from toolkit import x
                out += [(f"toolkit.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return [(m, line) for m, line in out if m.split(".")[0] in ("toolkit", "miniature", "tests")]


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        out.append((".".join(rel.parts).removesuffix(".__init__"), path))
    return out


def test_every_room_has_a_rank():
    rooms = {room(m) for m, _ in modules()} - {"__init__"}
    assert rooms <= set(RANKS), f"rooms without a rank in this test: {sorted(rooms - set(RANKS))}"


def test_imports_point_down():
    bad = []
    for mod, path in modules():
        src = room(mod)
        for target, line in imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            if target.split(".")[0] != "toolkit":
                bad.append(f"{where} (outside the package)")
                continue
            dst = room(target)
            if dst in ("__init__", src):
                continue
            if dst == "tasks":
                bad.append(f"{where} (nothing imports a task)")
            elif RANKS[dst] >= RANKS[src]:
                bad.append(f"{where} ({src}, rank {RANKS[src]}, may not import {dst}, rank {RANKS[dst]})")
    assert not bad, "imports against the layout:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    """The walker sees a function-level import (the kind a cycle hides in)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from toolkit.tasks import train\n    import toolkit.report.table\n")
    assert [m for m, _ in imports(f)] == ["toolkit.tasks", "toolkit.report.table"]
