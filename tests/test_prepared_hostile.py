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

import numpy as np
import pytest

from tests.conftest import tiny_overrides
from tests.test_prepare import prepare_cfg
from toolkit.data.names import MAX_JSON_BYTES, UnsafeName, check_name, check_sha256, name_problem
from toolkit.data.prepared import BadShard, PreparedDataset
from toolkit.data.shards import ENCODED, INDEX
from toolkit.data.storage import StorageError
from toolkit.hashing import digest_key, text_key
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


def add_rows(root: Path, store: str, name: str, keys: list[str], rows: np.ndarray | None = None,
             keys_text: str | None = None) -> None:
    """``<name>.npy`` + ``<name>.keys.json`` (``keys``, or ``keys_text`` as written) into
    ``encoded/<store>/`` of the set at ``root``, listed (SHA-256, size) in its ``encoded.json``, as
    ``prepare.encode=true`` lays them out."""
    folder = root / "encoded" / store
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{name}.npy", np.zeros((len(keys), 2), np.float32) if rows is None else rows)
    (folder / f"{name}.keys.json").write_text(json.dumps(keys) if keys_text is None else keys_text)
    doc = json.loads((root / ENCODED).read_text()) if (root / ENCODED).is_file() else {"stores": {}, "jobs": {}}
    entry = doc["stores"].setdefault(store, {"settings": {"kind": store.split("-")[0]}, "files": {}, "sizes": {}})
    for f in (folder / f"{name}.npy", folder / f"{name}.keys.json"):
        entry["files"][f.name], entry["sizes"][f.name] = hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_size
    (root / ENCODED).write_text(json.dumps(doc))


def image_keys(root: Path) -> list[str]:
    """The cache keys of the set's images (``toolkit.hashing.bytes_key`` of each), from its sidecars."""
    return [digest_key(s["sha256"]) for f in sorted(root.glob("shard-*.json"))
            for s in json.loads(f.read_text())["samples"]]


@pytest.fixture(scope="module")
def valid_set(imagefolder_data, tmp_path_factory) -> Path:
    """16 images in 4 shards, and an encoded store (as ``prepare.encode=true`` lays it out): one row per image."""
    root = tmp_path_factory.mktemp("valid")
    out = root / "set"
    prepare.run(prepare_cfg(imagefolder_data, str(out), root / "run"))
    add_rows(out, "latents-x", "a", image_keys(out))
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


def index_nested_deeply(root: Path, outside: Path) -> None:
    (root / INDEX).write_text("[" * 200_000 + "]" * 200_000)


def index_toolkit_not_an_object(root: Path, outside: Path) -> None:
    rewrite(root / INDEX, lambda d: d.update(toolkit="x"))


def encoded_sizes_a_list(root: Path, outside: Path) -> None:
    rewrite(root / ENCODED, lambda d: d["stores"]["latents-x"].update(sizes=[1, 2]))


def encoded_sizes_missing(root: Path, outside: Path) -> None:
    rewrite(root / ENCODED, lambda d: d["stores"]["latents-x"].pop("sizes"))


def keys_of_other_images(root: Path, outside: Path) -> None:
    """Rows for an image that is not the set's (a public image's latents, say), beside its own."""
    add_rows(root, "latents-x", "-", [digest_key(hashlib.sha256(b"someone else's image").hexdigest())])


def keys_nested_deeply(root: Path, outside: Path) -> None:
    add_rows(root, "latents-x", "b", [], keys_text="[" * 200_000 + "]" * 200_000)


def keys_more_than_rows(root: Path, outside: Path) -> None:
    add_rows(root, "latents-x", "b", image_keys(root)[:3], np.zeros((2, 2), np.float32))


def a_fifo(name: str) -> Callable[[Path, Path], None]:
    def tamper(root: Path, outside: Path) -> None:
        (root / name).unlink()
        os.mkfifo(root / name)   # nobody writes it: a reader that opens it waits forever
    return tamper


def shard_a_folder(root: Path, outside: Path) -> None:
    (root / "shard-000000.tar").unlink()
    (root / "shard-000000.tar").mkdir()


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
    "index.json: nested 200,000 deep": (index_nested_deeply, StorageError, r"index.json is nested too deeply"),
    "index.json: toolkit a string": (index_toolkit_not_an_object, UnsafeName,
                                     r"index.json: the document.toolkit is a string, not an object; refused"),
    "encoded.json: sizes a list": (encoded_sizes_a_list, UnsafeName,
                                   r"encoded.json: the document.stores.latents-x.sizes is a list, not an object"),
    "encoded.json: no sizes": (encoded_sizes_missing, StorageError,
                               r"encoded.json store latents-x: no size recorded for a.keys.json .*"
                               r"callbacks.encoded_cache.from_prepared=false"),
    "encoded keys: another image's": (keys_of_other_images, UnsafeName,
                                      r"encoded.json store latents-x file -.keys.json: row key '[0-9a-f]{24}' is none "
                                      r"of this set's images"),
    "encoded keys: nested 200,000 deep": (keys_nested_deeply, StorageError,
                                          r"encoded.json store latents-x file b.keys.json is nested too deeply"),
    "encoded keys: more keys than rows": (keys_more_than_rows, UnsafeName,
                                          r"latents-x file b.npy: an array of shape \(2, 2\) and dtype float32 for "
                                          r"the 3 keys of its list; refused"),
    "shard: a FIFO": (a_fifo("shard-000000.tar"), StorageError, r"set/shard-000000.tar is a FIFO, not a file"),
    "sidecar: a FIFO": (a_fifo("shard-000001.json"), StorageError, r"set/shard-000001.json is a FIFO, not a file"),
    "shard: a folder": (shard_a_folder, StorageError, r"set/shard-000000.tar is a folder, not a file"),
}


@pytest.mark.timeout(120)   # a FIFO opened for reading waits for a writer: a regression hangs, not passes
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
        for i in range(len(ds) if not case.startswith("encoded") else 0):   # every sample: every shard fetched
            ds[i]
        ds.fetch_encoded("latents-x", {"kind": "latents"}, local / "encoded" / "latents-x")   # as EncodedCache does
    assert listing(tmp_path) - before <= {str(local)} | {str(p) for p in local.rglob("*")}   # inside data.local...
    # ...and nothing kept there but verified arrays of a refused store (no reader sees them without their key lists)
    assert not [p for p in local.rglob("*") if p.is_file() and p.suffix != ".npy"]
    mine = [p for p in opened if p.startswith(str(tmp_path))]   # (none where a size is refused before reading)
    assert all(p.startswith((str(root) + "/", str(local) + "/")) for p in mine), mine


def test_the_valid_set_reads_whole(valid_set, tmp_path):
    """The fixture itself is readable, so each refusal above is the tampering's doing."""
    with opened_files() as opened:   # the audit hook sees the reads
        ds = PreparedDataset(str(valid_set), "image", "text", tmp_path / "local")
    assert any(p.endswith(INDEX) for p in opened) and len(ds) == 16 and all(ds[i]["image"]["bytes"] for i in range(16))
    assert ds.fetch_encoded("latents-x", {"kind": "latents"}, tmp_path / "enc")
    assert {p.name: p.read_bytes() for p in (tmp_path / "enc").iterdir()} == {
        p.name: p.read_bytes() for p in (valid_set / "encoded" / "latents-x").iterdir()}


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


def encoded_model(tiny_model: str) -> list[str]:
    return [f"model.name_or_path={tiny_model}", "module=lora_miniature", "callbacks.encoded_cache.dtype=float32"]


@pytest.fixture(scope="module")
def encoded_set(tiny_model, imagefolder_data, tmp_path_factory) -> Path:
    """The 16 images prepared with the tiny model's encoded rows (``prepare.encode=true``)."""
    root = tmp_path_factory.mktemp("encoded")
    prepare.run(prepare_cfg(imagefolder_data, str(root / "set"), root / "p", "prepare.encode=true",
                            *encoded_model(tiny_model)))
    return root / "set"


def train_cfg(tiny_model: str, imagefolder_data: Path, tmp_path: Path, remote: Path):
    """``task=train`` from the prepared set ``remote`` (one step), its cache and data.local in ``tmp_path``."""
    from tests.conftest import compose_cfg

    run = tmp_path / "run"
    base = [a for a in tiny_overrides(tiny_model, imagefolder_data, run) if not a.startswith("data.path=")]
    return compose_cfg([*base, "data=streaming", f"data.remote={remote}", f"data.local={tmp_path / 'local'}",
                        "data.val_fraction=0", "trainer.limit_val_batches=0", "trainer.max_steps=1",
                        "~callbacks.sample_grid", "callbacks.encoded_cache.dtype=float32",
                        f"paths.cache_dir={tmp_path / 'cache'}"], run)


def test_a_tampered_encoded_json_cannot_write_outside_the_cache(tiny_model, imagefolder_data, encoded_set, tmp_path):
    """The issue's reproduction: a set whose encoded.json names an absolute path outside the cache
    (with the payload's true SHA-256) made ``task=train data=streaming`` create that file and exit
    0. Now the run stops at start-up, naming the file and the name, before the model is loaded,
    and nothing is written outside the run dir, the cache and data.local."""
    from toolkit.tasks import train

    out = tmp_path / "set"
    shutil.copytree(encoded_set, out)
    victim = tmp_path / "victim" / "pwned.py"
    payload = b"print('pwned')\n"
    doc = json.loads((out / ENCODED).read_text())
    store = next(s for s in doc["stores"] if s.startswith("latents"))
    doc["stores"][store]["files"][str(victim)] = hashlib.sha256(payload).hexdigest()
    (out / "encoded" / store / str(victim).lstrip("/")).parent.mkdir(parents=True)
    (out / "encoded" / store / str(victim).lstrip("/")).write_bytes(payload)   # where the old reader found it
    (out / ENCODED).write_text(json.dumps(doc))
    before = listing(tmp_path)
    with pytest.raises(UnsafeName, match=rf"encoded.json store {store} file: '{victim}' is not a name inside the set "
                                         r"\(an absolute path\)"):
        train.run(train_cfg(tiny_model, imagefolder_data, tmp_path, out))
    assert not victim.exists()
    new = listing(tmp_path) - before
    assert all(p.startswith(tuple(str(tmp_path / d) for d in ("run", "cache", "local"))) for p in new), sorted(new)


def test_a_sets_rows_never_reach_runs_on_other_data(tiny_model, imagefolder_data, encoded_set, tmp_path):
    """The review's reproduction: a set adding ``-.npy`` + ``-.keys.json`` (sorting first) to its
    text store, a row for the empty caption (every run's caption dropout encodes it; it is the
    set's own key too, task=prepare encodes it), had training copy them into the shared cache,
    where every later run with this model took that row (first key wins), on any data. Now a run
    training from the set takes its rows from a folder of the set's own, and the shared store that
    runs on other data read holds none of them; a key that is none of the set's captions is refused.
    (The training cache's own code, as ``on_fit_start`` runs it; training from prepared rows end to
    end, into the set's folder: ``tests/test_prepare.py``.)"""
    from hydra.utils import instantiate

    from toolkit.data.encoded_cache import ArrayStore

    out = tmp_path / "set"
    shutil.copytree(encoded_set, out)
    store = next(s for s in json.loads((out / ENCODED).read_text())["stores"] if s.startswith("text"))
    shape = np.load(next((out / "encoded" / store).glob("*.npy"))).shape[1:]
    poison = np.full((1, *shape), 1e4, np.float32)
    add_rows(out, store, "-", [text_key("")], poison)
    cfg = train_cfg(tiny_model, imagefolder_data, tmp_path, out)
    dm, module = instantiate(cfg.data), instantiate(cfg.module)
    dm.setup("fit")
    instantiate(cfg.callbacks.encoded_cache).encode(module, dm, {"rank": 0, "world_size": 1})
    cache = tmp_path / "cache" / "encoded"
    own = cache / f"prepared-{dm.train_set.ds.identity[:20]}"
    assert module.text_cache["prompt_embeds"].root == own / store   # this run: the set's rows, from its folder
    assert {p.name for p in (own / store).iterdir()} == {p.name for p in (out / "encoded" / store).iterdir()}
    shared = ArrayStore(cache / store)   # what a run on other data with this model reads (and encodes into)
    assert text_key("") not in shared or not np.array_equal(shared.get(text_key("")), poison[0])

    add_rows(out, store, "-", [text_key(""), text_key("a caption the set does not have")], np.concatenate([poison] * 2))
    with pytest.raises(UnsafeName, match=rf"{store} file -.keys.json: row key '[0-9a-f]{{24}}' is none of this "
                                         r"set's captions \(or the empty caption\)"):
        PreparedDataset(str(out), "image", "text", tmp_path / "local").fetch_encoded(
            store, {"kind": "text"}, tmp_path / "again")


def test_a_damaged_key_list_in_the_encoded_cache_is_refused_naming_it(tmp_path):
    """The cache reads its ``.keys.json`` files as a set's JSON is read: a regular file below the
    cap, a list of strings; anything else is a refusal naming the file, not a RecursionError,
    TypeError or a read of gigabytes."""
    from toolkit.data.encoded_cache import ArrayStore

    root = tmp_path / "store"
    ArrayStore(root).write(["a", "b"], np.zeros((2, 3), np.float32))
    for text, message in (("[" * 200_000 + "]" * 200_000, "is nested too deeply"),
                          ("[1, 2]", r"the document\[0\] is an integer, not a string"),
                          ('{"a": 0}', "the document is an object, not a list"),
                          (None, rf"is larger than {MAX_JSON_BYTES:,} bytes")):
        if text is None:
            with open(root / "x.keys.json", "r+b") as f:   # sparse: no disk used
                f.truncate(MAX_JSON_BYTES + 1)
        else:
            (root / "x.keys.json").write_text(text)
        with pytest.raises(StorageError, match=rf"x.keys.json.*{message}.*delete it and x.npy beside it"):
            ArrayStore(root)


def test_an_edited_sidecar_is_another_reference_set(valid_set, tmp_path):
    """Evaluation keys its cached reference features by the set's identity: the index and every
    sidecar (captions, sizes, spans), so a set whose sidecar changed never reuses stale features."""
    from toolkit.evaluation.reference import cache_key, load_reference

    root = tmp_path / "set"
    shutil.copytree(valid_set, root)
    before = load_reference(str(root), "image", "text", "train", None, local=str(tmp_path / "local")).identity
    rewrite(root / "shard-000001.json", lambda d: d["samples"][0].update(caption="another caption"))
    after = load_reference(str(root), "image", "text", "train", None, local=str(tmp_path / "local")).identity
    assert before != after and cache_key(before, {}) != cache_key(after, {})
