"""A prepared set from someone else is data, never a way in: a valid set (``task=prepare``), then
tampered with, case by case. Each is refused with a message naming the file and the offending
value; no file appears outside ``data.local`` (the temp root is listed before and after) and no
file outside the set and ``data.local`` is opened (an audit hook records every ``open``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from tests.test_prepare import prepare_cfg
from toolkit.data.names import MAX_JSON_BYTES, UnsafeName, check_name, check_sha256, name_problem
from toolkit.data.prepared import BadShard, PreparedDataset
from toolkit.data.shards import ENCODED, INDEX
from toolkit.data.storage import StorageError
from toolkit.tasks import prepare

_OPENED: list[list[str]] = []   # the recordings in progress (the hook stays: audit hooks cannot be removed)


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED and isinstance(args[0], str | bytes | Path):
        _OPENED[-1].append(os.path.normpath(os.path.abspath(os.fsdecode(args[0]))))   # ".." folded, links kept


sys.addaudithook(_audit)


@contextlib.contextmanager
def opened_files() -> Iterator[list[str]]:
    """Every file this process opens inside the block (Python's ``open`` audit event)."""
    _OPENED.append([])
    try:
        yield _OPENED[-1]
    finally:
        _OPENED.pop()


def listing(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def rewrite(path: Path, change: Callable[[dict], None]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def valid_set(imagefolder_data, tmp_path_factory) -> Path:
    """16 images in 4 shards, and an encoded store (as ``prepare.encode=true`` lays it out) with one file."""
    root = tmp_path_factory.mktemp("valid")
    out = root / "set"
    prepare.run(prepare_cfg(imagefolder_data, str(out), root / "run"))
    payload = b"rows"
    (out / "encoded" / "latents-x").mkdir(parents=True)
    (out / "encoded" / "latents-x" / "a.npy").write_bytes(payload)
    (out / ENCODED).write_text(json.dumps({"stores": {"latents-x": {
        "settings": {"kind": "latents"}, "files": {"a.npy": hashlib.sha256(payload).hexdigest()},
        "sizes": {"a.npy": len(payload)}}}, "jobs": {}}))
    return out


def encoded_file(name: str, sha: str | None = None) -> Callable[[Path, Path], None]:
    def tamper(root: Path, outside: Path) -> None:
        payload = b"print('pwned')\n"
        name_ = name.format(outside=outside)
        # the payload where the reader's f"encoded/<store>/<name>" would find it, so only the check stops it
        (root / "encoded" / "latents-x" / name_.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / "encoded" / "latents-x" / name_.lstrip("/")).write_bytes(payload)
        rewrite(root / ENCODED, lambda d: d["stores"]["latents-x"]["files"].update(
            {name_: sha or hashlib.sha256(payload).hexdigest()}))
    return tamper


def shard_url(url: str) -> Callable[[Path, Path], None]:
    def tamper(root: Path, outside: Path) -> None:
        shutil.copy(root / "shard-000000.tar", outside / "shard-000000.tar")   # a valid shard, outside the set
        rewrite(root / INDEX, lambda d: d["shardlist"][0].update(url=url.format(outside=outside)))
    return tamper


def shard_sha(value: str) -> Callable[[Path, Path], None]:
    return lambda root, outside: rewrite(root / INDEX, lambda d: d["shardlist"][0].update(sha256=value))


def symlinked_shard(root: Path, outside: Path) -> None:
    shutil.copy(root / "shard-000000.tar", outside / "shard-000000.tar")
    (root / "shard-000000.tar").unlink()
    (root / "shard-000000.tar").symlink_to(outside / "shard-000000.tar")


def sidecar_drops_a_sample(root: Path, outside: Path) -> None:
    rewrite(root / "shard-000000.json", lambda d: d["samples"].pop())


def span_past_the_end(root: Path, outside: Path) -> None:
    size = json.loads((root / INDEX).read_text())["shardlist"][0]["filesize"]
    rewrite(root / "shard-000000.json", lambda d: d["samples"][0].update(span=[size - 10, 100]))


def index_undercounts_the_shard(root: Path, outside: Path) -> None:
    """The index (and sidecar) say the shard is 512 bytes shorter than it is: every span still fits."""
    for name in (INDEX, "shard-000000.json"):
        rewrite(root / name, lambda d: (d["shardlist"][0] if "shardlist" in d else d).update(
            filesize=(d["shardlist"][0] if "shardlist" in d else d)["filesize"] - 512))


def index_not_json(root: Path, outside: Path) -> None:
    (root / INDEX).write_text('{"shardlist": [')


def index_over_the_cap(root: Path, outside: Path) -> None:
    with open(root / INDEX, "r+b") as f:   # sparse: no disk used
        f.truncate(MAX_JSON_BYTES + 1)


# case -> (tampering, error, the message it must carry)
CASES = {
    "encoded.json file: absolute path": (encoded_file("{outside}/pwned.py"), UnsafeName,
                                         r"encoded.json store latents-x file: '/.*/pwned.py' is not a name inside the "
                                         r"set \(an absolute path\)"),
    "encoded.json file: ..": (encoded_file("../../../outside/pwned.py"), UnsafeName,
                              r"encoded.json store latents-x file: '../../../outside/pwned.py' .*\(a '..' component\)"),
    "encoded.json sha256: a path": (encoded_file("b.npy", "../../../outside/x"), UnsafeName,
                                    r"encoded.json store latents-x file b.npy: sha256 '../../../outside/x' is not a "
                                    r"SHA-256"),
    "index.json shard url: ..": (shard_url("../outside/shard-000000.tar"), UnsafeName,
                                 r"index.json shard 0 url: '../outside/shard-000000.tar' is not a name inside the set "
                                 r"\(a '..' component\)"),
    "index.json shard url: absolute": (shard_url("{outside}/shard-000000.tar"), UnsafeName,
                                       r"index.json shard 0 url: '/.*/outside/shard-000000.tar' .*"
                                       r"\(an absolute path\)"),
    "index.json shard url: another location": (shard_url("file:///etc/passwd"), UnsafeName,
                                               r"index.json shard 0 url: 'file:///etc/passwd' .*\(a URL"),
    "index.json shard url: backslashes": (shard_url("..\\outside\\shard-000000.tar"), UnsafeName,
                                          r"index.json shard 0 url: .* \(a backslash\)"),
    "index.json shard url: NUL": (shard_url("shard-000000.tar\0.png"), UnsafeName,
                                  r"index.json shard 0 url: 'shard-000000.tar\\x00.png' .*\(a NUL character\)"),
    "index.json sha256: a path": (shard_sha("../../outside/x"), UnsafeName,
                                  r"index.json shard 0 \(shard-000000.tar\): sha256 '../../outside/x' is not a "
                                  r"SHA-256"),
    "shard: a symlink out of the set": (symlinked_shard, UnsafeName,
                                        r"'shard-000000.tar' resolves to .*/outside/shard-000000.tar, outside .*/set "
                                        r"\(a symbolic link out of the set\)"),
    "sidecar: fewer samples than the index": (sidecar_drops_a_sample, UnsafeName,
                                              r"shard-000000.json: lists 4 samples, the index counts 5"),
    "sidecar: span past the shard's end": (span_past_the_end, UnsafeName,
                                           r"shard-000000.json sample 0: byte span \[\d+, 100\] ends at \d+, past the "
                                           r"shard's end \(\d+ bytes"),
    "shard: more bytes than the index says": (index_undercounts_the_shard, BadShard,
                                              r"shard-000000.tar holds more than the [\d,]+ bytes index.json records; "
                                              r"stopped reading it"),
    "index.json: not JSON": (index_not_json, StorageError, r"index.json is not JSON \(Expecting value"),
    "index.json: over the size cap": (index_over_the_cap, StorageError,
                                      rf"index.json is larger than {MAX_JSON_BYTES:,} bytes, the cap on a prepared "
                                      r"set's JSON files"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_prepared_set_is_refused_and_nothing_escapes(case, valid_set, tmp_path):
    tamper, error, message = CASES[case]
    root, outside, local = tmp_path / "set", tmp_path / "outside", tmp_path / "local"
    shutil.copytree(valid_set, root)
    outside.mkdir()
    tamper(root, outside)
    before = listing(tmp_path)
    with opened_files() as opened, pytest.raises(error, match=message):
        ds = PreparedDataset(str(root), "image", "text", local)
        for i in range(len(ds)):   # every sample: every shard fetched
            ds[i]
        ds.fetch_encoded("latents-x", {"kind": "latents"}, local / "encoded" / "latents-x")
    assert listing(tmp_path) - before <= {str(local)} | {str(p) for p in local.rglob("*")}   # inside data.local...
    assert not [p for p in local.rglob("*") if p.is_file()]   # ...and nothing kept there
    mine = [p for p in opened if p.startswith(str(tmp_path))]   # (none where a size is refused before reading)
    assert all(p.startswith((str(root) + "/", str(local) + "/")) for p in mine), mine


def test_the_valid_set_reads_whole(valid_set, tmp_path):
    """The fixture itself is readable, so each refusal above is the tampering's doing."""
    with opened_files() as opened:   # the audit hook sees the reads
        ds = PreparedDataset(str(valid_set), "image", "text", tmp_path / "local")
    assert any(p.endswith(INDEX) for p in opened) and len(ds) == 16 and all(ds[i]["image"]["bytes"] for i in range(16))
    assert ds.fetch_encoded("latents-x", {"kind": "latents"}, tmp_path / "enc")
    assert (tmp_path / "enc" / "a.npy").read_bytes() == b"rows"


def test_names_that_would_become_paths():
    ok = ["shard-000000.tar", "part-001/shard-000003.tar", "encoded/latents-ab12/3f9c.keys.json"]
    bad = {"": "not a non-empty", "/etc/passwd": "absolute", "~/.ssh/authorized_keys": "absolute",
           "C:/x": "absolute", "a/../../b": "'..'", "..": "'..'", "a//b": "empty", "./a": "'.'",
           "a\\..\\b": "backslash", "a\nb": "line break", "a\0b": "NUL", "s3://b/x": "URL", ".hidden": "starting with",
           "a b.tar": "characters", "x" * 2000: "longer", 7: "not a non-empty"}
    assert all(name_problem(n) is None for n in ok)
    for name, why in bad.items():
        assert why in (name_problem(name) or ""), (name, name_problem(name))
    with pytest.raises(UnsafeName, match=r"encoded.json: 'a/b' .*\(a folder"):
        check_name("a/b", "encoded.json", single=True)
    for value in ("../x", "A" * 64, "0" * 63, None):
        with pytest.raises(UnsafeName, match="is not a SHA-256"):
            check_sha256(value, "index.json")


def test_a_tampered_part_record_stops_the_merge(imagefolder_data, tmp_path):
    """A killed prepare is continued from its part records: their shard names are checked as the index's are."""
    out = tmp_path / "set"
    prepare.run(prepare_cfg(imagefolder_data, str(out), tmp_path / "r1"))
    (out / INDEX).unlink()   # "killed" before the merge
    rewrite(out / "parts" / "000-of-001.json", lambda d: d["shards"][1].update(url="../../outside.tar"))
    with pytest.raises(UnsafeName, match=r"parts/000-of-001.json shard 1 url: '../../outside.tar' .*'..' component"):
        prepare.run(prepare_cfg(imagefolder_data, str(out), tmp_path / "r2"))
    assert not (out / INDEX).exists()


def test_a_tampered_encoded_json_cannot_write_outside_the_cache(tiny_model, imagefolder_data, tmp_path):
    """The issue's reproduction: a set whose encoded.json names an absolute path outside the cache
    (with the payload's true SHA-256) made ``task=train data=streaming`` create that file and exit
    0. Now the run stops at start-up, naming the file and the name, before the model is loaded,
    and nothing is written outside the run dir, the cache and data.local."""
    from tests.conftest import compose_cfg
    from toolkit.tasks import train

    model = [f"model.name_or_path={tiny_model}", "module=lora_miniature", "callbacks.encoded_cache.dtype=float32"]
    out = tmp_path / "set"
    prepare.run(prepare_cfg(imagefolder_data, str(out), tmp_path / "p", "prepare.encode=true", *model))
    victim = tmp_path / "victim" / "pwned.py"
    payload = b"print('pwned')\n"
    doc = json.loads((out / ENCODED).read_text())
    store = next(s for s in doc["stores"] if s.startswith("latents"))
    doc["stores"][store]["files"][str(victim)] = hashlib.sha256(payload).hexdigest()
    (out / "encoded" / store / str(victim).lstrip("/")).parent.mkdir(parents=True)
    (out / "encoded" / store / str(victim).lstrip("/")).write_bytes(payload)   # where the old reader found it
    (out / ENCODED).write_text(json.dumps(doc))
    run, cache, local = tmp_path / "run", tmp_path / "cache", tmp_path / "local"
    before = listing(tmp_path)
    base = [a for a in tiny_overrides(tiny_model, imagefolder_data, run) if not a.startswith("data.path=")]
    cfg = compose_cfg([*base, "data=streaming", f"data.remote={out}", f"data.local={local}", "data.val_fraction=0",
                       "trainer.limit_val_batches=0", "callbacks.encoded_cache.dtype=float32",
                       f"paths.cache_dir={cache}"], run)
    with pytest.raises(UnsafeName, match=rf"encoded.json store {store} file: '{victim}' is not a name inside the set "
                                         r"\(an absolute path\)"):
        train.run(cfg)
    assert not victim.exists()
    new = listing(tmp_path) - before
    assert all(p.startswith((str(run), str(cache), str(local))) for p in new), sorted(new)
