"""task=prepare: a captioned dataset into tar shards with a wids index, in a local folder or on an
S3-compatible server (moto in server mode on 127.0.0.1: the same boto3 client and settings a
user's AWS/R2/MinIO bucket uses); rejected items never reach a shard; a killed prepare continues
without duplicates; bad storage settings fail fast, naming the URL; secrets stay out of the run."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.conftest import compose_cfg, run_entry, tiny_overrides
from tests.helpers import free_port
from tests.test_hostile_data import REJECTED, make_hostile
from toolkit.data.shards import INDEX
from toolkit.data.storage import StorageError, check_url
from toolkit.tasks import prepare

SECRET = "s3cr3t-never-logged-0123456789"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    return make_hostile(tmp_path_factory.mktemp("hostile") / "data")


@pytest.fixture
def s3(monkeypatch):
    """An S3-compatible server for this test, and the standard AWS variables pointing at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "AKIATESTING", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3").create_bucket(Bucket="datasets")
    yield env
    server.stop()


def prepare_cfg(data: Path, output: str, run: Path, *extra: str):
    return compose_cfg(["task=prepare", f"data.path={data}", "data.resolution=16", f"prepare.output={output}",
                        "prepare.samples_per_shard=5", f"hydra.run.dir={run}", *extra], run)


def read_back(index: Path) -> list[dict]:
    """Every sample through wids itself (the reader training will use)."""
    import wids

    ds = wids.ShardListDataset(str(index), transformations=[], cache_dir=str(index.parent / ".wids"))
    return [ds[i] for i in range(len(ds))]


def test_prepare_keeps_exactly_the_usable_items_with_their_bytes(hostile, tmp_path):
    out = tmp_path / "shards"
    counts = prepare.run(prepare_cfg(hostile, str(out), tmp_path / "run"))
    report = json.loads((out / "prepare_report.json").read_text())
    assert {Path(r["item"]).name: r["reason"] for r in report["rejected"]} == REJECTED
    assert counts["kept"] == report["counts"]["kept"] == counts["total"] - len(REJECTED)
    samples = read_back(out / INDEX)
    assert len(samples) == counts["kept"] and counts["shards"] == -(-counts["kept"] // 5)
    names = set()
    for s in samples:
        meta = json.loads(s[".json"].read())
        src = Path(meta["source"])
        names.add(src.name)
        image = next(v for k, v in s.items() if k not in (".json", ".txt", "__key__", "__index__", "__shard__",
                                                          "__shardindex__", "__dataset__"))
        assert image.read() == src.read_bytes()   # the file's bytes, unchanged
        caption = s[".txt"].read().decode()
        assert caption == meta["caption"] == src.with_suffix(".txt").read_text().strip()
        assert meta["width"] > 0 and meta["height"] > 0
    assert not names & set(REJECTED)


def test_prepare_to_s3_equals_the_local_one_and_resumes_after_a_kill(hostile, tmp_path, s3):
    import boto3

    local = tmp_path / "local"
    prepare.run(prepare_cfg(hostile, str(local), tmp_path / "r1"))
    prepare.run(prepare_cfg(hostile, "s3://datasets/hostile/v1", tmp_path / "r2"))
    client = boto3.client("s3")

    def objects() -> dict[str, bytes]:
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="datasets", Prefix="hostile/v1/")["Contents"]]
        return {k.split("/")[-1]: client.get_object(Bucket="datasets", Key=k)["Body"].read() for k in keys}

    remote = objects()
    tars = sorted(k for k in remote if k.endswith(".tar"))
    assert tars and all(remote[k] == (local / k).read_bytes() for k in tars)   # byte-identical shards
    assert json.loads(remote[INDEX])["shardlist"] == json.loads((local / INDEX).read_text())["shardlist"]

    # "killed" while writing the last shard: its sidecar, the process's part record and the index
    # were never published
    for name in (INDEX, "parts/000-of-001.json", tars[-1].replace(".tar", ".json")):
        client.delete_object(Bucket="datasets", Key=f"hostile/v1/{name}")
    counts = prepare.run(prepare_cfg(hostile, "s3://datasets/hostile/v1", tmp_path / "r3"))
    again = objects()
    assert counts["shards_written_now"] == 1   # nothing lost, nothing twice: every object as before
    reports = ("prepare_report.json", "000-of-001.json")   # they count the shards written by this attempt
    assert {k: v for k, v in again.items() if k not in reports} == {k: v for k, v in remote.items() if k not in reports}
    # the same command once more: already prepared
    assert prepare.run(prepare_cfg(hostile, "s3://datasets/hostile/v1", tmp_path / "r4"))["kept"] == counts["kept"]


def test_another_dataset_into_the_same_output_is_refused(hostile, imagefolder_data, tmp_path):
    out = tmp_path / "shards"
    prepare.run(prepare_cfg(hostile, str(out), tmp_path / "r1"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(StorageError, match="another dataset or other settings .*content.data.path.*never overwritten"):
        prepare.run(prepare_cfg(imagefolder_data, str(out), tmp_path / "r2"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_bad_storage_fails_fast_naming_the_url_and_what_to_set(hostile, tmp_path, s3):
    t0 = time.time()
    with pytest.raises(StorageError, match=r"s3://missing-bucket/x .*(NoSuchBucket|404).*does not exist"):
        prepare.run(prepare_cfg(hostile, "s3://missing-bucket/x", tmp_path / "r1"))
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"   # nothing listens there
    with pytest.raises(StorageError, match=r"s3://datasets/x .*cannot connect.*AWS_ENDPOINT_URL"):
        prepare.run(prepare_cfg(hostile, "s3://datasets/x", tmp_path / "r2"))
    assert time.time() - t0 < 60
    for url in ("s3://AKIA:secret@datasets/x", "s3://datasets/x?X-Amz-Signature=abc"):
        with pytest.raises(StorageError, match="credentials in a storage URL") as err:
            check_url(url)
        assert "secret" not in str(err.value) and "abc" not in str(err.value)


def test_credentials_never_reach_the_run_dir(hostile, tmp_path, s3):
    run = tmp_path / "run"
    res = run_entry(["task=prepare", f"data.path={hostile}", "data.resolution=16",
                     "prepare.output=s3://datasets/secret-check", f"hydra.run.dir={run}"], env=s3)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "prepare_report.json").is_file()
    for f in run.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in res.stdout + res.stderr


def test_training_from_prepared_shards_equals_training_from_the_folder(tiny_model, imagefolder_data, tmp_path, s3):
    """The same images, captions and order: the adapter trained from the shards (local, and on S3)
    is the one trained from the folder, bit for bit; start-up reads no image."""
    from tests.conftest import tiny_overrides
    from tests.test_fault_tolerance import ADAPTER, same_tensors
    from toolkit.tasks import train

    prepare.run(prepare_cfg(imagefolder_data, str(tmp_path / "shards"), tmp_path / "p1"))
    prepare.run(prepare_cfg(imagefolder_data, "s3://datasets/ims", tmp_path / "p2"))
    runs = {}
    for name, path in (("folder", imagefolder_data), ("local", tmp_path / "shards"), ("s3", "s3://datasets/ims")):
        out = tmp_path / name
        source = [f"data.path={path}"] if name != "s3" else ["data=streaming", f"data.remote={path}"]
        base = [a for a in tiny_overrides(tiny_model, imagefolder_data, out) if not a.startswith("data.path=")]
        args = [*base, *source, "data.val_fraction=0",
                "trainer.limit_val_batches=0", "data.random_flip=true", f"paths.cache_dir={tmp_path / f'c-{name}'}",
                f"data.local={tmp_path / f'scratch-{name}'}"]
        train.run(compose_cfg(args, out))
        runs[name] = out / ADAPTER
    assert same_tensors(runs["folder"], runs["local"]) and same_tensors(runs["folder"], runs["s3"])
    assert len(list((tmp_path / "scratch-s3").glob("*.tar"))) == len(list((tmp_path / "shards").glob("*.tar")))


def test_a_damaged_shard_is_named(imagefolder_data, tmp_path):
    from toolkit.data.prepared import BadShard, PreparedDataset

    out = tmp_path / "shards"
    prepare.run(prepare_cfg(imagefolder_data, str(out), tmp_path / "p"))
    shard = out / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = PreparedDataset(str(out), "image", "text", tmp_path / "scratch")
    with pytest.raises(BadShard, match=r"shard-000000.tar: its bytes do not match the SHA-256"):
        ds[0]


def test_sigkill_and_resume_from_s3_shards_is_bit_identical(tiny_model, imagefolder_data, tmp_path, s3):
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.test_fault_tolerance import ADAPTER, resume_overrides, same_tensors, wait_for

    prepare.run(prepare_cfg(imagefolder_data, "s3://datasets/resume", tmp_path / "p"))

    def args(out: Path) -> list[str]:
        return [*resume_overrides(tiny_model, imagefolder_data, out), "data.path=s3://datasets/resume",
                f"paths.cache_dir={tmp_path / 'cache'}", f"data.local={tmp_path / 'scratch'}"]

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    whole = subprocess.run([sys.executable, str(ROOT / "run.py"), *args(tmp_path / "whole")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoints" / "step=4.ckpt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = run_entry([*args(out), "ckpt_path=last"], env=s3)
    assert res.returncode == 0, res.stderr[-3000:]
    assert same_tensors(out / ADAPTER, tmp_path / "whole" / ADAPTER)


def test_data_remote_and_a_different_data_path_are_refused():
    from toolkit.data.datamodule import CaptionedImageDataModule

    with pytest.raises(ValueError, match="data.remote='s3://b/x' and data.path='other': give one"):
        CaptionedImageDataModule("other", remote="s3://b/x")


def steps_seen(folder: Path) -> dict[int, frozenset]:
    """Step → the items trained on in it, summed over the ranks' records (``WriteBatchKeys``)."""
    out: dict[int, set] = {}
    for f in folder.glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["step"], set()).update(row["keys"])
    return {k: frozenset(v) for k, v in sorted(out.items())}


def test_one_and_two_processes_on_shards_train_on_the_same_items_and_2_resumes_on_1(tiny_model, imagefolder_data,
                                                                                   tmp_path):
    """The same global batch on 1 and on 2 processes trains on the same images in each step; a run
    started on 2 processes and resumed on 1 (accumulating the same 2 micro-batches per step) continues
    exactly where it stopped."""
    from tests.conftest import tiny_overrides

    prepare.run(prepare_cfg(imagefolder_data, str(tmp_path / "shards"), tmp_path / "p"))

    def args(out: Path, *extra: str) -> list[str]:
        base = [a for a in tiny_overrides(tiny_model, imagefolder_data, out) if not a.startswith("data.path=")]
        return [*base, f"data.path={tmp_path / 'shards'}", f"data.local={tmp_path / 'scratch'}", "data.val_fraction=0",
                "trainer.limit_val_batches=0", "~callbacks.sample_grid", "trainer.max_steps=6",
                f"paths.cache_dir={tmp_path / 'cache'}", "+callbacks.keys._target_=tests.helpers.WriteBatchKeys",
                f"+callbacks.keys.dirpath={out / 'keys'}", *extra]

    one = tmp_path / "one"
    res = run_entry(args(one))
    assert res.returncode == 0, res.stderr[-3000:]
    two = tmp_path / "two"
    res = run_entry(args(two, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=3"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((two / "keys").glob("rank*.jsonl"))) == 2
    # 1 process accumulating the 2 micro-batches the 2 processes computed per step
    res = run_entry([f"hydra.run.dir={two}", "ckpt_path=last", "trainer.devices=1", "trainer.accumulate_grad_batches=2",
                     "trainer.max_steps=6"])
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = steps_seen(one / "keys"), steps_seen(two / "keys")
    assert list(want) == list(range(6)) and all(len(v) == 4 for v in want.values())   # into a 2nd epoch
    assert got == want


def test_sdxl_with_buckets_from_shards_equals_the_folder(tiny_sdxl, tmp_path):
    """Aspect-ratio buckets from the sizes the prepare stored, SDXL's micro-conditioning from the
    cut each image was made with: the adapter trained from the shards is the folder's, bit for bit."""
    from tests.test_fault_tolerance import ADAPTER, same_tensors
    from tests.test_sdxl import make_mixed, xl_overrides
    from toolkit.tasks import train

    data = make_mixed(tmp_path / "mixed")
    prepare.run(prepare_cfg(data, str(tmp_path / "shards"), tmp_path / "p"))
    outs = {}
    for name, path in (("folder", data), ("shards", tmp_path / "shards")):
        out = tmp_path / name
        args = [a for a in xl_overrides(tiny_sdxl, data, out, "trainer.max_steps=4", "~callbacks.sample_grid",
                                        f"paths.cache_dir={tmp_path / f'c-{name}'}") if not a.startswith("data.path")]
        cfg = compose_cfg([*args, f"data.path={path}", f"data.local={tmp_path / 'scratch'}"], out)
        assert cfg.data.buckets and train.run(cfg)["global_step"] == 4
        outs[name] = out / ADAPTER
    assert same_tensors(outs["folder"], outs["shards"])


def test_wrong_credentials_fail_fast_naming_the_url_and_the_variable(hostile, tmp_path, s3, monkeypatch):
    """The server checks signatures (moto's IAM auth on): an unknown key and a wrong secret each get
    their own error, naming the URL and the variable to check; the secret itself is never shown."""
    import boto3
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    iam = boto3.client("iam")
    iam.create_user(UserName="trainer")
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)   # every request authenticated from now
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    assert prepare.run(prepare_cfg(hostile, "s3://datasets/auth", tmp_path / "ok"))["kept"] > 0
    t0 = time.time()
    for key_id, secret, want in (("AKIAUNKNOWN0000", SECRET, r"InvalidAccessKeyId.*check AWS_ACCESS_KEY_ID"),
                                 (key["AccessKeyId"], SECRET, r"SignatureDoesNotMatch.*check AWS_SECRET_ACCESS_KEY")):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        with pytest.raises(StorageError, match=rf"s3://datasets/auth2 .*{want}") as err:
            prepare.run(prepare_cfg(hostile, "s3://datasets/auth2", tmp_path / "bad"))
        assert SECRET not in str(err.value)
    assert time.time() - t0 < 30


def _read_all(args: tuple[str, str]) -> list[bytes]:
    from toolkit.data.prepared import PreparedDataset

    ds = PreparedDataset(args[0], "image", "text", args[1])
    return [ds[i]["image"]["bytes"] for i in range(len(ds))]


def test_two_runs_sharing_data_local_at_once_read_the_same_verified_shards(imagefolder_data, tmp_path):
    """data.local is shared safely: shards named by their SHA-256 and published by rename, so two
    processes fetching the same shards at the same moment both read whole, verified files."""
    import multiprocessing as mp

    out, scratch = tmp_path / "shards", tmp_path / "scratch"
    prepare.run(prepare_cfg(imagefolder_data, str(out), tmp_path / "p"))
    with mp.get_context("spawn").Pool(2) as pool:
        a, b = pool.map(_read_all, [(str(out), str(scratch))] * 2)
    assert a == b and len(a) == 16
    assert sorted(p.name for p in scratch.iterdir() if p.suffix == ".tar") == sorted(
        f"{json.loads((out / INDEX).read_text())['shardlist'][j]['sha256']}.tar" for j in range(4))
    assert not list(scratch.glob(".*.tmp"))   # no half-written file left behind


def test_prepare_spread_over_two_processes_reads_as_the_one_process_prepare(hostile, tmp_path):
    """Each rank scans and shards its block into its own sub-stream; the merged index reads the
    same items, in the same order, with the same bytes and the same report as one process."""
    from tests.test_multinode import logs_of, torchrun
    from toolkit.data.prepared import PreparedDataset

    one, two = tmp_path / "one", tmp_path / "two"
    prepare.run(prepare_cfg(hostile, str(one), tmp_path / "r1"))
    # two "nodes" of one process each (torchrun agents, c10d rendezvous): they meet through the output only
    nodes = torchrun(2, 1, ["task=prepare", f"data.path={hostile}", "data.resolution=16", f"prepare.output={two}",
                            "prepare.samples_per_shard=5"], tmp_path, "prep2")
    logs = logs_of(nodes)
    assert all(p.returncode == 0 for p in nodes), logs[0][-3000:] + logs[1][-3000:]
    assert (two / "part-000").is_dir() and (two / "part-001").is_dir()   # one sub-stream per rank
    a, b = (PreparedDataset(str(p), "image", "text", tmp_path / f"scratch-{p.name}") for p in (one, two))
    unplaced = lambda ds: [{k: v for k, v in x.items() if k != "span"} for x in ds.samples]   # spans follow the cut
    assert unplaced(a) == unplaced(b) and len(a) > 0
    assert all(a[i]["image"]["bytes"] == b[i]["image"]["bytes"] for i in range(len(a)))
    ra, rb = (json.loads((p / "prepare_report.json").read_text()) for p in (one, two))
    assert ra["rejected"] == rb["rejected"] and ra["counts"]["kept"] == rb["counts"]["kept"]
    assert {Path(r["item"]).name for r in rb["rejected"]} == set(REJECTED)
    # a killed 2-process prepare is continued with 2 processes, not silently re-cut by one
    (two / INDEX).unlink()
    with pytest.raises(StorageError, match="started with 2 processes: continue it with as many"):
        prepare.run(prepare_cfg(hostile, str(two), tmp_path / "r3"))


def encoded_files(cache: Path) -> dict[str, set[str]]:
    return {d.name: {f.name for f in d.iterdir()} for d in cache.iterdir() if d.is_dir()}


def test_prepared_encoder_rows_train_the_unet_alone_and_equal_encoding_here(tiny_model, tiny_model_v,
                                                                           imagefolder_data, tmp_path, s3):
    """prepare.encode=true: training fetches the stored rows (encodes nothing itself) and trains the
    adapter a run encoding its own cache trains, bit for bit; a model with other encoder weights is
    refused, naming both fingerprints; adding that model's rows to the set makes it usable too."""
    from tests.conftest import tiny_overrides
    from tests.test_fault_tolerance import ADAPTER, same_tensors
    from toolkit.data.prepared import EncodedMismatch, PreparedDataset
    from toolkit.tasks import train

    model = [f"model.name_or_path={tiny_model}", "module=lora_miniature", "data.random_flip=true",
             "callbacks.encoded_cache.dtype=float32"]
    url = "s3://datasets/encoded"
    counts = prepare.run(prepare_cfg(imagefolder_data, url, tmp_path / "p", "prepare.encode=true", *model))
    assert counts["encoded_stores"] == 3   # latents, micro-conditioning, text

    def train_args(out: Path, source: list[str], model_path: str = tiny_model) -> list[str]:
        base = [a for a in tiny_overrides(model_path, imagefolder_data, out) if not a.startswith("data.path=")]
        return [*base, *source, "data.val_fraction=0", "trainer.limit_val_batches=0", "data.random_flip=true",
                "callbacks.encoded_cache.dtype=float32", f"paths.cache_dir={out}-cache", f"data.local={out}-scratch"]

    runs = {}
    for name, source in (("prepared", ["data=streaming", f"data.remote={url}"]),
                         ("here", [f"data.path={imagefolder_data}"])):
        out = tmp_path / name
        train.run(compose_cfg(train_args(out, source), out))
        runs[name] = out
    stored = json.loads(s3_object("datasets", "encoded/encoded.json"))["stores"]
    # the prepared run's cache holds exactly the fetched files, in the set's own folder (runs on other
    # data never read it): nothing was encoded at training
    cache = Path(f"{runs['prepared']}-cache") / "encoded"
    identity = PreparedDataset(url, "image", "text", tmp_path / "scratch").identity
    assert [d.name for d in cache.iterdir()] == [f"prepared-{identity[:20]}"]
    fetched = encoded_files(next(cache.iterdir()))
    assert fetched == {k: set(v["files"]) for k, v in stored.items()}
    assert encoded_files(Path(f"{runs['here']}-cache") / "encoded").keys() == stored.keys()   # same stores, same keys
    assert same_tensors(runs["prepared"] / ADAPTER, runs["here"] / ADAPTER)

    other = tmp_path / "other"
    for extra, what in (([], "text_encoders"), (["callbacks.encoded_cache.text=false"], "vae")):
        both = rf"{what}: [0-9a-f]{{16}} \(prepared\) ≠ [0-9a-f]{{16}} \(this run\)"   # both fingerprints
        with pytest.raises(EncodedMismatch, match=both):
            train.run(compose_cfg([*train_args(other, ["data=streaming", f"data.remote={url}"], tiny_model_v),
                                   *extra], other))
    model_v = [a.replace(tiny_model, tiny_model_v) for a in model]
    prepare.run(prepare_cfg(imagefolder_data, url, tmp_path / "p2", "prepare.encode=true", *model_v))
    assert len(json.loads(s3_object("datasets", "encoded/encoded.json"))["stores"]) == 6   # both models' rows
    out = tmp_path / "other2"
    train.run(compose_cfg(train_args(out, ["data=streaming", f"data.remote={url}"], tiny_model_v), out))
    assert (out / ADAPTER).is_file()


def s3_object(bucket: str, key: str) -> bytes:
    import boto3

    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def test_eval_reads_a_prepared_reference_set_as_the_folder(tiny_model, tiny_clip, imagefolder_data, tmp_path, s3):
    """eval.dataset=s3://… (a task=prepare output): the same reference images, so the same scores."""
    from tests.test_eval import eval_overrides
    from toolkit.tasks import eval as eval_task

    prepare.run(prepare_cfg(imagefolder_data, "s3://datasets/ref", tmp_path / "p"))
    scores = {}
    for name, ref in (("folder", str(imagefolder_data)), ("prepared", "s3://datasets/ref")):
        out = tmp_path / name
        m = eval_task.run(compose_cfg([*eval_overrides(tiny_model, tiny_clip, ref, tmp_path / f"m-{name}", out),
                                       f"paths.cache_dir={tmp_path / f'c-{name}'}"], out))
        scores[name] = {k: m[k] for k in ("n_real", "fid", "kid", "clip_score")}
        row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
        assert SECRET not in json.dumps(row)
    assert scores["folder"]["n_real"] == 16 and scores["prepared"] == scores["folder"]
    assert any((tmp_path / "c-prepared" / "prepared").glob("*.tar"))   # fetched to the node-local cache


def test_a_sample_damaged_in_data_local_is_named(imagefolder_data, tmp_path):
    """Each sample is read at its recorded byte span and checked against its SHA-256: a shard file
    damaged after it was fetched (scratch disks fail) names the sample, never trains on it."""
    from toolkit.data.prepared import BadShard, PreparedDataset

    prepare.run(prepare_cfg(imagefolder_data, str(tmp_path / "shards"), tmp_path / "p"))
    ds = PreparedDataset(str(tmp_path / "shards"), "image", "text", tmp_path / "scratch")
    assert ds[3]["image"]["bytes"] == Path(ds.samples[3]["source"]).read_bytes()
    tar = next((tmp_path / "scratch").glob("*.tar"))
    offset, size = ds.samples[3]["span"]
    blob = bytearray(tar.read_bytes())
    blob[offset + size // 2] ^= 0xFF
    tar.write_bytes(bytes(blob))
    with pytest.raises(BadShard, match=rf"sample 3 \(.*{Path(ds.samples[3]['source']).name}\) does not match"):
        ds[3]


def noise_images(root: Path, n: int, side: int) -> Path:
    """``n`` captioned images of random noise, stored uncompressed (each ~3·side² bytes: shards of MBs)."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), np.uint8)).save(root / f"{i:03d}.png", compress_level=0)
        (root / f"{i:03d}.txt").write_text(f"noise {i}")
    return root


def test_shards_above_the_multipart_threshold_upload_in_parts_and_read_back_byte_identical(tmp_path, s3):
    """Shards of ~7.7 MB with prepare.multipart_mb=5: each goes up in two parts (boto3's managed
    transfer; the object's ETag says how many), the objects equal the local prepare's shards byte
    for byte, and a fetch (streamed to disk, hashed as it arrives) gives back every image's bytes."""
    import boto3

    from toolkit.data.prepared import PreparedDataset

    data = noise_images(tmp_path / "noise", 8, 800)
    local = tmp_path / "local"
    prepare.run(prepare_cfg(data, str(local), tmp_path / "r1", "prepare.samples_per_shard=4"))
    prepare.run(prepare_cfg(data, "s3://datasets/big", tmp_path / "r2", "prepare.samples_per_shard=4",
                            "prepare.multipart_mb=5"))
    client = boto3.client("s3")
    tars = sorted(p.name for p in local.glob("*.tar"))
    assert len(tars) == 2 and all((local / t).stat().st_size > 7 * 2**20 for t in tars)
    for t in tars:
        obj = client.get_object(Bucket="datasets", Key=f"big/{t}")
        assert obj["ETag"].strip('"').endswith("-2")   # a multipart upload of two parts
        assert obj["Body"].read() == (local / t).read_bytes()
    ds = PreparedDataset("s3://datasets/big", "image", "text", tmp_path / "scratch")
    assert [ds[i]["image"]["bytes"] for i in range(8)] == [(data / f"{i:03d}.png").read_bytes() for i in range(8)]
    fetched = {p.name: p.read_bytes() for p in (tmp_path / "scratch").glob("*.tar")}
    assert sorted(fetched.values()) == sorted((local / t).read_bytes() for t in tars)


def test_endpoint_credentials_are_refused_redacted_and_never_reach_the_run(hostile, tmp_path, s3, monkeypatch):
    """``prepare.endpoint_url`` (or any URL in the config: refused before Hydra saves the config) and
    ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` (refused before any request) with ``user:secret@``:
    the run stops saying what to do; the marker secret is in no file of the run, nor in its output."""
    from toolkit.config import check_overrides
    from toolkit.data.prepared import PreparedDataset

    marker = "m4rker-endp0int-s3cret"
    host = s3["AWS_ENDPOINT_URL"].removeprefix("http://")
    base = ["task=prepare", f"data.path={hostile}", "data.resolution=16"]
    runs = {"config": (["prepare.output=s3://datasets/e1", f"prepare.endpoint_url=http://user:{marker}@{host}"], s3,
                       f"prepare.endpoint_url=http://<redacted>@{host}: credentials in a URL would be saved"),
            "environment": (["prepare.output=s3://datasets/e2"], {**s3, "AWS_ENDPOINT_URL": f"http://u:{marker}@{host}"},
                            f"http://<redacted>@{host}: credentials in the S3 endpoint (AWS_ENDPOINT_URL)")}
    for name, (args, env, message) in runs.items():
        run = tmp_path / name
        res = run_entry([*base, *args, f"hydra.run.dir={run}"], env=env)
        assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
        assert marker not in res.stdout + res.stderr
        assert not [f for f in run.rglob("*") if f.is_file() and marker.encode() in f.read_bytes()]
    assert not (tmp_path / "config").exists()   # refused before Hydra made the run dir
    for override in (f"data.remote=s3://AKIA:{marker}@datasets/x",
                     f"eval.dataset=s3://datasets/x?X-Amz-Signature={marker}"):
        problem = check_overrides(["task=finetune_eval", "data=streaming", override])
        assert "credentials in a URL" in problem and marker not in problem
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"https://k:{marker}@example.com")   # a training run's reader: the same
    with pytest.raises(StorageError, match=r"https://<redacted>@example.com: credentials in the S3 endpoint "
                                           r"\(AWS_ENDPOINT_URL_S3\)") as err:
        PreparedDataset("s3://datasets/e1", "image", "text", tmp_path / "scratch")
    assert marker not in str(err.value)


def test_training_refuses_a_set_prepared_with_a_policy_that_keeps_other_items(imagefolder_data, tmp_path):
    """Training never rescans a prepared set, so a run whose data policy would keep other items
    (or other captions) than the prepare did is refused, naming both settings; the smallest side
    counts where small images are skipped (upscaled ones are kept whatever it is)."""
    from toolkit.data.datamodule import CaptionedImageDataModule

    def setup(out: Path, resolution: int, **policy) -> None:
        CaptionedImageDataModule(str(out), resolution=resolution, global_batch_size=2, policy=policy,
                                 local=str(tmp_path / "scratch")).setup("fit")

    default, skip = tmp_path / "default", tmp_path / "skip"
    prepare.run(prepare_cfg(imagefolder_data, str(default), tmp_path / "p1"))   # data.resolution=16, upscale
    prepare.run(prepare_cfg(imagefolder_data, str(skip), tmp_path / "p2", "data.policy.small_images=skip"))
    setup(default, 16)
    setup(default, 32)   # upscale: the same items at any resolution
    setup(skip, 16, small_images="skip")
    for out, resolution, policy, diff in (
            (default, 16, {"small_images": "skip"}, "small_images: upscale (prepared) ≠ skip (this run)"),
            (default, 16, {"captions": "empty"}, "captions: skip (prepared) ≠ empty (this run)"),
            (skip, 32, {"small_images": "skip"}, "min_side: 16 (prepared) ≠ 32 (this run)"),
            (skip, 16, {"small_images": "skip", "min_side": 8}, "min_side: 16 (prepared) ≠ 8 (this run)")):
        with pytest.raises(ValueError, match=rf"{out} was prepared with a data policy that keeps other items than "
                                             rf"this run's \({re.escape(diff)}\); training never rescans"):
            setup(out, resolution, **policy)


def large_datasets_commands() -> list[str]:
    """The shell commands of the docs' "Large datasets" section (docs/data.md, else the README),
    continuation lines joined, comments dropped."""
    from tests.conftest import ROOT

    for page in (ROOT / "docs" / "data.md", ROOT / "README.md"):
        text = page.read_text() if page.is_file() else ""
        m = re.search(r"^(#+) Large datasets.*?\n", text, re.M)
        if m:   # up to the next heading of its level or above
            end = re.search(rf"^#{{1,{len(m.group(1))}}} ", text[m.end():], re.M)
            section = text[m.end(): m.end() + end.start() if end else len(text)]
            blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
            lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
            return [" ".join(line.split("#")[0].split()) for line in lines if line.strip()]
    raise AssertionError("no 'Large datasets' section in docs/data.md or README.md")


def test_the_large_datasets_commands_run_as_written(tiny_model, imagefolder_data, tmp_path, s3):
    """Every command of the docs' "Large datasets" section, through the real entry point, with its
    placeholders substituted (the dataset, folders, the S3 endpoint and bucket; the model, shrunk
    to a few CPU steps): the prepare line without data.resolution takes the model's (the embedded
    miniature's 32 px), and training reads the set from the bucket."""
    import shlex

    sub = {"data.path=my_data": f"data.path={imagefolder_data}", "/data/my_data_shards": str(tmp_path / "shards"),
           "https://<account>.r2.cloudflarestorage.com": s3["AWS_ENDPOINT_URL"], "s3://bucket/": "s3://datasets/",
           "/local/nvme/shards": str(tmp_path / "scratch"),
           "model.name_or_path=...": f"model.name_or_path={tiny_model} module=lora_miniature debug=fast "
                                     "trainer.max_steps=2 data.global_batch_size=4 ~callbacks.sample_grid "
                                     "trainer.enable_progress_bar=false"}
    commands = large_datasets_commands()
    assert len(commands) == 3 and sum("task=prepare" in c for c in commands) == 2
    for i, command in enumerate(commands):
        for placeholder, value in sub.items():
            command = command.replace(placeholder, value)
        words = shlex.split(command)
        env = dict(w.split("=", 1) for w in words[: words.index("python")])
        assert words[words.index("python") + 1] == "run.py" and "<" not in command and "..." not in command, command
        res = run_entry([*words[words.index("python") + 2:], f"hydra.run.dir={tmp_path / f'run{i}'}"],
                        env={**s3, **env, "TOOLKIT_CACHE": str(tmp_path / "cache")})
        assert res.returncode == 0, f"{command}\n{res.stderr[-3000:]}"
    plan = json.loads((tmp_path / "shards" / INDEX).read_text())["toolkit"]
    assert plan["min_side"] == 32   # data.resolution from the (default, embedded) model
    assert (tmp_path / "run2" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert len(list((tmp_path / "scratch").glob("*.tar"))) == 1   # 16 images: one shard, fetched from the bucket


def test_a_prepare_made_by_the_previous_version_is_continued_and_extended(imagefolder_data, tmp_path):
    """The previous version recorded the policy as its repr, this one as the fields that decide what
    is kept: plans are compared by meaning, so an old finished set is prepared again as "already
    prepared" (the path ``prepare.encode=true`` takes to add rows) and trains, a killed old prepare
    continues where it stopped, and another policy is still refused."""
    from toolkit.data.prepared import PreparedDataset
    from toolkit.data.shards import PLAN
    from toolkit.data.validate import DataPolicy

    out = tmp_path / "shards"
    prepare.run(prepare_cfg(imagefolder_data, str(out), tmp_path / "p1"))
    old = repr(DataPolicy())   # what the previous version wrote, e.g. "DataPolicy(on_error='skip', ...)"
    assert old.startswith("DataPolicy(on_error='skip', small_images='upscale'")
    for name, at in ((PLAN, lambda d: d), (INDEX, lambda d: d["toolkit"])):
        doc = json.loads((out / name).read_text())
        at(doc)["policy"] = old
        (out / name).write_text(json.dumps(doc))
    tars = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert prepare.run(prepare_cfg(imagefolder_data, str(out), tmp_path / "p2"))["kept"] == 16   # finished: as is
    PreparedDataset(str(out), "image", "text", tmp_path / "scratch").check_plan(16, DataPolicy())   # trains
    for name in (INDEX, "parts/000-of-001.json", "shard-000003.json"):   # "killed" while writing the last shard
        (out / name).unlink()
    assert prepare.run(prepare_cfg(imagefolder_data, str(out), tmp_path / "p3"))["shards_written_now"] == 1
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == tars
    with pytest.raises(StorageError, match=r"other settings \(differs in: policy, data\.policy\.captions\)"):
        prepare.run(prepare_cfg(imagefolder_data, str(out), tmp_path / "p4", "data.policy.captions=empty"))


def test_s3_without_credentials_or_endpoint_fails_fast_in_training_and_evaluation(tiny_model, imagefolder_data,
                                                                                  tmp_path, monkeypatch):
    """Training (``task=train data=streaming``) and evaluation's reference loader reach S3 when
    they open a prepared set (one reader, ``PreparedDataset``): missing credentials and an
    unreachable endpoint are the same ``StorageError`` as in task=prepare, naming the URL and what
    to set, within seconds (each shown on one of the two entry points)."""
    from toolkit.evaluation.reference import load_reference
    from toolkit.tasks import train

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    for var in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(var, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")   # no instance role to find here
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")   # nothing listens there
    out = tmp_path / "run"
    base = [a for a in tiny_overrides(tiny_model, imagefolder_data, out) if not a.startswith("data.path=")]
    cfg = compose_cfg([*base, "data=streaming", "data.remote=s3://datasets/x", f"data.local={tmp_path / 'scratch'}"],
                      out)
    t0 = time.time()
    where = re.escape("s3://datasets/x (endpoint http://127.0.0.1:9)")
    with pytest.raises(StorageError, match=rf"{where}: no credentials found; set AWS_ACCESS_KEY_ID"):
        train.run(cfg)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTING")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with pytest.raises(StorageError, match=rf"{where}: cannot connect to the endpoint; set AWS_ENDPOINT_URL"):
        load_reference("s3://datasets/x", "image", "text", "train", None, local=str(tmp_path / "scratch"))
    assert time.time() - t0 < 30


def test_secrets_holding_slashes_or_arriving_through_the_environment_are_refused_before_anything_is_written(
        hostile, tmp_path, monkeypatch):
    """AWS secret keys hold ``/``: a URL's user info runs to its ``@`` whatever it holds (urlparse
    would end it at the first ``/``), and legitimate ``@``s in paths pass. A secret reaching a value
    through ``${oc.env:…}`` is refused as resolved: where the config is composed (before the run dir
    exists) and, for a sweep's values (first resolved in the cell), at the task's start before the
    run's history is written: the marker is in no file and no output."""
    from toolkit.config import check_overrides, has_credentials, redact_url

    marker = "M4RKER-s3cret"
    slashed = {"prepare.output": f"s3://AKIAEXAMPLE:{marker}/abc@bucket/p",
               "prepare.endpoint_url": f"http://user:{marker}/x@127.0.0.1:1"}
    for key, value in slashed.items():
        assert has_credentials(value) and marker not in redact_url(value)
        problem = check_overrides(["task=prepare", f"{key}={value}"])
        assert f"{key}=" in problem and "credentials in a URL" in problem and marker not in problem
    for value in ("https://host:8080/@user", "s3://bucket/run:1@v2", "git+https://github.com/org/repo@v1",
                  "http://minio:9000", "s3://bucket/a@b/c"):
        assert not has_credentials(value), value
    endpoint = f"http://u:{marker}@127.0.0.1:1"
    monkeypatch.setenv("EP", endpoint)
    problem = check_overrides(["task=prepare", "prepare.output=s3://bucket/p", "prepare.endpoint_url=${oc.env:EP}"])
    assert "prepare.endpoint_url=http://<redacted>@127.0.0.1:1: credentials" in problem and marker not in problem
    sweep = tmp_path / "sweep"
    res = run_entry(["-m", "task=prepare", f"data.path={hostile}", "data.resolution=16", "prepare.output=s3://bucket/p",
                     "prepare.endpoint_url=${oc.env:EP},${oc.env:EP}", f"hydra.sweep.dir={sweep}"],
                    env={"EP": endpoint})
    assert res.returncode != 0 and "prepare.endpoint_url=http://<redacted>@127.0.0.1:1: credentials" in res.stderr, \
        res.stderr[-2000:]
    assert marker not in res.stdout + res.stderr
    assert not [f for f in sweep.rglob("*") if f.is_file() and marker.encode() in f.read_bytes()]
