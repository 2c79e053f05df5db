"""Names that a dataset supplies, checked before they become paths: a prepared set is data, never a
way in.

A prepared set (``task=prepare``) is shared: a lab publishes it, others train from it, and every
name in it is untrusted input. Where a name from the set becomes a path:

- ``index.json``: each shard's ``url`` (read from the set; its sidecar is ``<url minus .tar>.json``)
  and ``sha256`` (the fetched shard's file name in ``data.local``: ``<sha256>.tar``);
- part records (``parts/*.json``, ``encoded/parts/*.json``): the same shard entries and encoded
  file names, before ``task=prepare`` merges them into the index / ``encoded.json``;
- ``encoded.json``: each store's folder and file names (read from ``encoded/<store>/<file>`` in
  the set, written to ``<cache>/encoded/<store>/<file>``) and their ``sha256``.

Each goes through ``check_name`` (a relative name made of plain components: no absolute path,
no ``..`` / ``.`` / empty component, no URL, no NUL, line break or backslash, letters, digits
and ``. _ -`` only) or ``check_sha256`` (64 lowercase hex digits), and a local store joins names
with ``inside`` (the resolved path, symlinks followed, must stay under the resolved root). Every
JSON file of a set is read whole only below ``MAX_JSON_BYTES``, and its structure checked against
a schema (``check_schema``: objects, lists, strings and integers where the reader expects them)
before any field is used. A violation raises ``UnsafeName`` naming the file and the offending
value, before anything is fetched or written.

A source dataset's ``metadata.jsonl`` / ``metadata.csv`` ``file_name`` goes through
``outside_dataset``: a row naming a file outside the dataset's folder (absolute, or ``..`` out of
it) is a counted rejection, "path outside the dataset" (``toolkit.data.sources``).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

# A set's JSON files are read whole (json.loads): above this, refused before reading. 256 MiB
# holds an index of ~1.5 M shards or a sidecar of ~800 k samples, far beyond what task=prepare
# writes (1000 samples per shard: ~300 KB sidecars), and keeps a hostile file from taking the
# reader's memory.
MAX_JSON_BYTES = 256 * 2**20
MAX_NAME_CHARS = 1024
_COMPONENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class UnsafeName(ValueError):
    """A name or value from a dataset that would reach outside it (or is not what it claims)."""


def shown(value: Any) -> str:
    """``value`` for a message: repr (a newline or NUL stays visible), at most 200 characters."""
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}… ({len(text)} characters)"


def name_problem(name: Any) -> str | None:
    """Why ``name`` is not a relative name inside a set (None: it is one)."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if len(name) > MAX_NAME_CHARS:
        return f"longer than {MAX_NAME_CHARS} characters"
    for char, what in (("\0", "a NUL character"), ("\n", "a line break"), ("\r", "a line break"),
                       ("\\", "a backslash")):
        if char in name:
            return what
    if "://" in name:
        return "a URL (a set names its files relative to itself)"
    if name.startswith(("/", "~")) or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "a '..' component"
    if any(p in ("", ".") for p in parts):
        return "an empty or '.' component"
    if not all(_COMPONENT.fullmatch(p) for p in parts):
        return "characters other than letters, digits, '.', '_' and '-' (or a component starting with '.')"
    return None


def check_name(name: Any, listed_in: str, single: bool = False) -> str:
    """``name`` if it is a relative name inside the set (``single``: one component, no folder);
    else ``UnsafeName`` naming ``listed_in`` (the file and entry it came from) and the name."""
    why = name_problem(name)
    if why is None and single and "/" in name:
        why = "a folder (a file name is expected)"
    if why is not None:
        raise UnsafeName(f"{listed_in}: {shown(name)} is not a name inside the set ({why}); refused before anything "
                         "was fetched or written: the set may have been tampered with, prepare it again or ask its "
                         "publisher")
    return name


def check_sha256(value: Any, listed_in: str) -> str:
    """``value`` if it is a SHA-256 hex digest (64 lowercase hex digits; it names a local file)."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise UnsafeName(f"{listed_in}: sha256 {shown(value)} is not a SHA-256 (64 lowercase hex digits); refused "
                         "before anything was fetched or written: the set may have been tampered with")
    return value


def check_count(value: Any, listed_in: str, what: str, low: int = 0, high: int | None = None) -> int:
    """``value`` if it is an integer in ``[low, high]`` (a count, size or byte offset from a set)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise UnsafeName(f"{listed_in}: {what} {shown(value)} is not an integer {bound}; refused: the set may have "
                         "been tampered with")
    return value


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "a boolean", type(None): "null"}


def check_schema(value: Any, schema: Any, where: str) -> Any:
    """``value`` (parsed JSON) if it has the shape ``schema`` describes, else ``UnsafeName`` naming
    ``where`` and the path to the first misfit. A schema is a type or tuple of types (``bool`` is
    no ``int``), ``[item]`` (a list of such items), ``{key: schema}`` (an object with these keys; a
    key ending in ``?`` may be absent; other keys are left alone) or ``{str: schema}`` (an object
    whose every value fits). Hand-written (a few lines) rather than jsonschema: that would be one
    more dependency (here it is only a transitive one) for a handful of small shapes, and its
    messages name schema paths, not the file and field a user can look at."""
    def fits(value: Any, schema: Any, path: str) -> None:
        if isinstance(schema, list):
            fits(value, list, path)
            for i, item in enumerate(value):
                fits(item, schema[0], f"{path}[{i}]")
        elif isinstance(schema, dict):
            fits(value, dict, path)
            if str in schema:
                for k, v in value.items():
                    fits(v, schema[str], f"{path}.{k}")
                return
            for key, sub in schema.items():
                name = key.removesuffix("?")
                if name in value:
                    fits(value[name], sub, f"{path}.{name}")
                elif not key.endswith("?"):
                    raise UnsafeName(f"{where}: {path} has no {name!r}; refused: not what task=prepare writes (the "
                                     "set may have been damaged or tampered with)")
        else:
            types = schema if isinstance(schema, tuple) else (schema,)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                want = " or ".join(_JSON_TYPES.get(t, t.__name__) for t in types)
                got = _JSON_TYPES.get(type(value), type(value).__name__)
                raise UnsafeName(f"{where}: {path} is {got}, not {want}; refused: not what task=prepare "
                                 "writes (the set may have been damaged or tampered with)")
    fits(value, schema, "the document")
    return value


def inside(root: Path, name: str, listed_in: str) -> Path:
    """``root / name`` after ``check_name``, and only if it resolves (symlinks followed) under the
    resolved ``root``: a symlink in the set cannot lead a read or a write outside it."""
    path = root / check_name(name, listed_in)
    real, base = path.resolve(), root.resolve()
    if real != base and base not in real.parents:
        raise UnsafeName(f"{listed_in}: {shown(name)} resolves to {real}, outside {base} (a symbolic link out of the "
                         "set); refused")
    return path


def outside_dataset(name: Any) -> bool:
    """Whether a metadata row's ``file_name`` names a file outside the dataset's folder: absolute,
    ``..`` out of it (backslashes read as separators), a URL, or a NUL."""
    if not isinstance(name, str):
        return False
    text = name.replace("\\", "/")
    norm = posixpath.normpath(text)
    return "://" in text or "\0" in text or text.startswith("/") or norm == ".." or norm.startswith("../")
