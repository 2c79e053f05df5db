"""Hostile datasets: every bad case gets a defined behaviour, a count and a report line."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import compose_cfg, tiny_overrides
from toolkit.data.datamodule import CaptionedImageDataModule
from toolkit.data.sources import load_captioned
from toolkit.data.validate import BadItem, DataPolicy, EmptyDatasetError, decode_image
from toolkit.tasks import train

RES = 16
# file -> reason it must be rejected with under the default policy
REJECTED = {
    "truncated.jpg": "corrupt or truncated image", "zero.png": "empty file",
    "notimage.png": "not an image", "bomb.png": "decompression bomb",
    "nocap.png": "missing caption", "emptycap.png": "empty caption",
    "badutf.png": "caption not UTF-8", "dup.png": "duplicate name", "dup.jpg": "duplicate name",
}
# file -> what the conversion note must mention
CONVERTED = {"cmyk.jpg": "CMYK", "png16.png": "I;16", "rgba.png": "RGBA", "la.png": "LA",
             "palette.png": "P", "gray.png": "from L", "exif.jpg": "EXIF", "small.png": "upscaled"}


def _rgb(seed: int, size: tuple[int, int] = (24, 24)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8))


def make_hostile(root: Path, good: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cap = lambda name, text="a red circle": (root / name).with_suffix(".txt").write_text(text)
    for i in range(good):
        _rgb(i).save(root / f"good{i}.png")
        cap(f"good{i}.png", f"picture {i}")
    _rgb(50).save(root / "truncated.jpg", quality=95)
    data = (root / "truncated.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "notimage.png").write_text("this is not a PNG")
    Image.new("1", (10000, 9000)).save(root / "bomb.png")      # 90 M pixels > Pillow's 89.5 M
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(root / "cmyk.jpg")   # red in CMYK
    Image.fromarray(np.full((24, 24), 65535, np.uint16)).save(root / "png16.png")   # white, 16 bit
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[:12, :, :] = (0, 0, 255, 255)       # top half opaque blue, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.new("LA", (24, 24), (100, 128)).save(root / "la.png")
    pal = Image.new("P", (24, 24), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(root / "palette.png")
    Image.new("L", (24, 24), 200).save(root / "gray.png")
    wide = Image.new("RGB", (40, 24), (255, 0, 0))
    exif = wide.getexif()
    exif[0x0112] = 6                           # "rotate 90° clockwise to display"
    wide.save(root / "exif.jpg", exif=exif.tobytes())
    _rgb(60, (8, 8)).save(root / "small.png")
    for name in ("truncated.jpg", "zero.png", "notimage.png", "bomb.png", *CONVERTED):
        cap(name)
    _rgb(70).save(root / "nocap.png")
    _rgb(71).save(root / "emptycap.png")
    cap("emptycap.png", "   \n")
    _rgb(72).save(root / "badutf.png")
    (root / "badutf.txt").write_bytes(b"a \xff\xfe caption")
    _rgb(73).save(root / "dup.png")
    _rgb(74).save(root / "dup.jpg")
    cap("dup.png")
    return root


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    return make_hostile(tmp_path_factory.mktemp("hostile") / "data")


def datamodule(path: Path, tmp_path: Path, **policy) -> CaptionedImageDataModule:
    return CaptionedImageDataModule(str(path), resolution=RES, global_batch_size=2, policy=policy,
                                    report_dir=str(tmp_path), scan_cache_dir=str(tmp_path / "cache"))


def test_scan_reports_exactly_the_bad_files(hostile, tmp_path):
    dm = datamodule(hostile, tmp_path)
    dm.setup("fit")
    report = json.loads((tmp_path / "data_report_train.json").read_text())
    rejected = {Path(r["item"]).name: r["reason"] for r in report["rejected"]}
    assert rejected == REJECTED   # the exact reason is the key; the detail is beside it
    assert report["counts"] == {r: list(REJECTED.values()).count(r) for r in set(REJECTED.values())}
    details = {Path(r["item"]).name: r["detail"] for r in report["rejected"]}
    assert details["badutf.png"].startswith("badutf.txt: ") and "dup.jpg / dup.png" in details["dup.png"]
    converted = {Path(r["item"]).name: r["what"] for r in report["converted"]}
    assert set(converted) == set(CONVERTED)
    for name, note in CONVERTED.items():
        assert note in converted[name], (name, converted[name])
    assert len(dm.train_set) == report["total"] - len(REJECTED) == 8 + len(CONVERTED)
    for i in range(len(dm.train_set)):   # every kept item decodes to a training tensor
        item = dm.train_set[(0, i)]
        assert item["pixel_values"].shape == (3, RES, RES) and item["caption"]
    # the second setup of the same data + policy is a cache hit
    again = datamodule(hostile, tmp_path)
    again.setup("fit")
    assert again.train_set.indices == dm.train_set.indices and len(list((tmp_path / "cache").iterdir())) == 1


def test_conversions_give_the_right_pixels(hostile):
    policy = DataPolicy(alpha_background=(255, 255, 0))
    img = lambda name: decode_image(str(hostile / name), policy, RES)[0]
    rgba = np.asarray(img("rgba.png"))
    assert rgba[0, 0].tolist() == [0, 0, 255] and rgba[-1, 0].tolist() == [255, 255, 0]   # composited
    assert np.asarray(img("png16.png"))[0, 0].tolist() == [255, 255, 255]                 # 16 -> 8 bit
    a = 128 / 255                                                      # 100 grey at alpha 128 on yellow
    want = [100 * a + 255 * (1 - a), 100 * a + 255 * (1 - a), 100 * a]
    assert np.allclose(np.asarray(img("la.png"))[0, 0], want, atol=1)
    assert np.asarray(img("palette.png"))[0, 0].tolist() == [0, 255, 0]
    assert np.asarray(img("gray.png"))[0, 0].tolist() == [200, 200, 200]
    red = np.asarray(img("cmyk.jpg"))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    rotated = img("exif.jpg")
    assert rotated.mode == "RGB" and rotated.size == (24, 40)   # 40x24 turned upright
    with pytest.raises(BadItem, match="smaller than the resolution"):
        decode_image(str(hostile / "small.png"), DataPolicy(small_images="skip"), RES)


def test_policy_error_names_the_first_bad_file(hostile, tmp_path):
    dm = datamodule(hostile, tmp_path, on_error="error", scan_workers=1)
    with pytest.raises(BadItem, match=r"^caption not UTF-8: \S*badutf\.png \(badutf\.txt: "):   # sorted: first
        dm.setup("fit")


def test_caption_policy_empty_keeps_captionless_images(hostile, tmp_path):
    dm = datamodule(hostile, tmp_path, captions="empty")
    dm.setup("fit")
    names = {Path(r["item"]).name for r in json.loads((tmp_path / "data_report_train.json").read_text())["rejected"]}
    assert not names & {"nocap.png", "emptycap.png", "badutf.png"}
    assert {"dup.png", "dup.jpg"} <= names   # a duplicate name is never guessed


def test_train_runs_on_the_hostile_dataset(tiny_model, hostile, tmp_path):
    out = tmp_path / "run"
    metrics = train.run(compose_cfg(tiny_overrides(tiny_model, hostile, out) + [
        "data.val_fraction=0", "trainer.max_steps=2"], out))
    assert metrics["global_step"] == 2 and (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert len(json.loads((out / "data_report_train.json").read_text())["rejected"]) == len(REJECTED)


def test_empty_dataset_stops_before_any_model_is_loaded(tiny_model, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "a.txt").write_text("x")
    (bad / "b.png").write_text("not an image")
    (bad / "b.txt").write_text("x")
    _rgb(1).save(bad / "c.png")                       # no caption
    loaded = []
    monkeypatch.setattr("toolkit.training.module.load_components", lambda **kw: loaded.append(kw))
    out = tmp_path / "run"
    with pytest.raises(EmptyDatasetError) as err:
        train.run(compose_cfg(tiny_overrides(tiny_model, bad, out) + ["data.val_fraction=0"], out))
    msg = str(err.value)
    assert "0 of 3 items usable" in msg and "1 empty file" in msg and "1 not an image" in msg
    assert "1 missing caption" in msg and not loaded


def test_loader_skips_a_file_broken_after_the_scan(tmp_path):
    root = make_hostile(tmp_path / "d", good=4)
    dm = datamodule(root, tmp_path)
    dm.setup("fit")
    first = dm.train_set.ds[dm.train_set.indices[0]]["image"]
    Path(first).write_bytes(b"")                       # corrupted mid-run
    assert dm.train_set[(0, 0)] is None                # logged and skipped, not raised
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch["pixel_values"], torch.Tensor)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width``×``height`` and holds no pixel data (Pillow reads the size only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_decompression_bomb_message_states_the_limit_in_force(tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(20000, 20000))          # 400 M pixels: over twice Pillow's limit
    limit = Image.MAX_IMAGE_PIXELS
    for path, policy, want in ((huge, DataPolicy(), f"400,000,000 pixels > limit {limit:,} (Pillow's"),
                               (tmp_path / "bomb.png", DataPolicy(), f"> limit {limit:,} (Pillow's"),
                               (tmp_path / "ok.png", DataPolicy(max_image_pixels=500),
                                "24x24 = 576 pixels > limit 500 (data.policy.max_image_pixels)")):
        if not path.exists():
            (Image.new("1", (10000, 9000)) if path.name == "bomb.png" else _rgb(0)).save(path)
        with pytest.raises(BadItem) as err:
            decode_image(str(path), policy, RES)
        assert err.value.reason == "decompression bomb" and want in err.value.detail, err.value.detail
        assert f"{2 * limit:,}" not in err.value.detail   # never Pillow's 2x refusal threshold
    with pytest.raises(ValueError, match=rf"max_image_pixels={3 * limit} is above {2 * limit}, the size Pillow"):
        DataPolicy(max_image_pixels=3 * limit)


@pytest.fixture
def folder_with_orphan(imagefolder_data, tmp_path) -> Path:
    """The imagefolder fixture plus one image that no metadata.jsonl row names."""
    root = tmp_path / "data"
    shutil.copytree(imagefolder_data, root)
    _rgb(99).save(root / "orphan.png")
    return root


def test_image_without_a_metadata_row_is_reported(folder_with_orphan, tmp_path):
    dm = datamodule(folder_with_orphan, tmp_path)
    dm.val_fraction = 0
    dm.setup("fit")
    report = json.loads((tmp_path / "data_report_train.json").read_text())
    assert [(Path(r["item"]).name, r["reason"]) for r in report["rejected"]] == [("orphan.png", "no metadata row")]
    assert report["total"] == 17 and report["counts"] == {"no metadata row": 1}
    assert report["summary"].startswith("16 of 17 items usable") and len(dm.train_set) == 16


def test_caption_policy_applies_to_an_image_without_a_metadata_row(folder_with_orphan, tmp_path):
    dm = datamodule(folder_with_orphan, tmp_path, captions="empty")
    dm.val_fraction = 0
    dm.setup("fit")
    kept = [Path(dm.train_set.ds[i]["image"]["path"]).name for i in dm.train_set.indices]
    assert len(kept) == 17 and "orphan.png" in kept          # trained unconditioned, as the policy says
    i = kept.index("orphan.png")
    assert dm.train_set[(0, i)]["caption"] == ""
    with pytest.raises(BadItem, match="^no metadata row: .*orphan.png"):
        datamodule(folder_with_orphan, tmp_path / "e", captions="error", on_error="error").setup("fit")


def test_missing_relative_data_folder_fails_fast_naming_both_readings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = time.monotonic()
    with pytest.raises(FileNotFoundError) as err:
        load_captioned("my_folder")
    assert time.monotonic() - t < 2
    msg = str(err.value)
    assert f"no local file or folder of that name (resolved to {tmp_path / 'my_folder'})" in msg
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in msg and "cannot be fetched as a hub dataset id" in msg
    with pytest.raises(FileNotFoundError, match=r"resolved to .*/no/such.* cannot be a hub dataset id"):
        load_captioned("./no/such/folder")


def test_missing_data_folder_online_asks_the_hub_once(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    calls = []

    def not_found(self, repo_id, **kw):
        calls.append((repo_id, kw["repo_type"], kw["timeout"]))
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(err, "404")
        raise err

    monkeypatch.setattr(HfApi, "repo_info", not_found)
    with pytest.raises(FileNotFoundError, match=r"no local file or folder .* and the hub has no dataset 'my_folder'"):
        load_captioned("my_folder")
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo_id, **kw: (_ for _ in ()).throw(OSError("unreachable")))
    with pytest.raises(ConnectionError, match=r"no local file or folder .* the hub could not be reached .*unreachable"):
        load_captioned("org/my_folder")
    assert calls == [("my_folder", "dataset", 5.0)]
    assert os.environ.get("HF_DATASETS_OFFLINE") is None


OUTSIDE_ROWS = ["../outside.png", "{abs}", "sub\\..\\..\\outside.png"]   # up, absolute, up with backslashes


def with_outside_rows(source: Path, tmp_path: Path, csv: bool) -> tuple[Path, Path]:
    """A copy of ``source`` whose metadata also names three files outside it (one exists: ``outside.png``)."""
    root = tmp_path / "data"
    shutil.copytree(source, root)
    outside = tmp_path / "outside.png"
    _rgb(5).save(outside)
    names = [n.format(abs=outside) for n in OUTSIDE_ROWS]
    if csv:
        with open(root / "metadata.csv", "a") as f:
            f.writelines(f'"{n}","a picture"\n' for n in names)
    else:
        with open(root / "metadata.jsonl", "a") as f:
            f.writelines(json.dumps({"file_name": n, "text": "a picture"}) + "\n" for n in names)
    return root, outside


@pytest.mark.parametrize("csv", [False, True], ids=["jsonl", "csv"])
def test_metadata_rows_outside_the_dataset_are_counted_rejections(csv, imagefolder_data, csv_data, tiny_model,
                                                                  tmp_path):
    """``datasets`` stops the whole set on the first such row (DatasetGenerationError); here each is a
    counted rejection, "path outside the dataset", in training (a task=train step on the jsonl
    layout; the datamodule's scan on the csv one) and in task=prepare, and the file it names is
    never opened."""
    from tests.test_prepare import prepare_cfg
    from tests.test_prepared_hostile import opened_files
    from toolkit.tasks import prepare

    root, outside = with_outside_rows(csv_data if csv else imagefolder_data, tmp_path, csv)
    out = tmp_path / "run"
    with opened_files() as opened:
        if csv:
            datamodule(root, out).setup("fit")
        else:
            metrics = train.run(compose_cfg(tiny_overrides(tiny_model, root, out) + [
                "data.val_fraction=0", "trainer.max_steps=1", "~callbacks.sample_grid"], out))
            assert metrics["global_step"] == 1
        counts = prepare.run(prepare_cfg(root, str(tmp_path / "shards"), tmp_path / "prep"))
    assert counts["kept"] == 16 and counts["rejected"] == 3
    for report in (out / "data_report_train.json", tmp_path / "shards" / "prepare_report.json"):
        rejected = json.loads(report.read_text())["rejected"]
        assert [r["reason"] for r in rejected] == ["path outside the dataset"] * 3, rejected
        assert [r["item"] for r in rejected] == [n.format(abs=outside) for n in OUTSIDE_ROWS]
        assert all(f"metadata.{'csv' if csv else 'jsonl'} line" in r["detail"] for r in rejected)
    assert str(outside) not in opened and not [p for p in opened if "outside" in Path(p).name]


def test_an_evaluation_reference_with_rows_outside_the_dataset_counts_them_rejected(imagefolder_data, tmp_path):
    """A reference set goes through the training data's policy (issue 43): a metadata row naming a
    file outside the dataset is a counted rejection, as in training, and its file is never read."""
    from tests.test_prepared_hostile import opened_files
    from toolkit.evaluation.reference import load_reference

    root, outside = with_outside_rows(imagefolder_data, tmp_path, csv=False)
    with opened_files() as opened:
        ref = load_reference(str(root), "image", "text", "train", None)
    assert ref.scan["rejected"] == {"path outside the dataset": 3} and ref.scan["total"] == len(ref.rows) + 3
    assert str(outside) not in opened
