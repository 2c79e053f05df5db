import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.data import transforms
from toolkit.data.datamodule import CaptionedImageDataModule, per_device_batch_size
from toolkit.data.sources import detect_format, load_captioned
from toolkit.data.validate import DataPolicy, decode_image


@pytest.mark.parametrize("fixture,fmt", [("imagefolder_data", "imagefolder"), ("csv_data", "imagefolder"),
                                         ("sidecar_data", "sidecar")])
def test_three_layouts_load_the_same_rows(request, imagefolder_data, fixture, fmt):
    path = request.getfixturevalue(fixture)
    assert detect_format(path) == fmt
    ds = load_captioned(str(path))
    ref = load_captioned(str(imagefolder_data))
    assert len(ds) == len(ref) == 16
    assert sorted(ds["text"]) == sorted(ref["text"])
    # images arrive undecoded (path/bytes); toolkit.data.validate decodes them under the policy
    assert decode_image(ds[0]["image"], DataPolicy(), 16)[0].mode == "RGB"


def test_missing_column_names_the_columns(imagefolder_data):
    with pytest.raises(KeyError, match="caption_column='caption'.*columns are"):
        load_captioned(str(imagefolder_data), caption_column="caption")


def test_missing_local_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no local file or folder of that name .* cannot be a hub"):
        detect_format(str(tmp_path / "nope"))


def test_transform_crop_flip_range():
    img = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1))[..., None].repeat(3, 2))
    rng = np.random.default_rng(0)
    x, _ = transforms.train_transform(img, 16, center_crop=True, random_flip=False, rng=rng)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    # center crop of the (32x16 after resize) gradient keeps the middle columns
    assert x[0, 0, 0] > -0.6 and x[0, 0, -1] < 0.6
    flipped = [transforms.train_transform(img, 16, True, True, np.random.default_rng(s))[0] for s in range(20)]
    assert any(torch.equal(f, x.flip(-1)) for f in flipped) and any(torch.equal(f, x) for f in flipped)


def test_global_batch_must_divide():
    assert per_device_batch_size(16, 2, 2) == 4
    with pytest.raises(ValueError, match="multiple of 6"):
        per_device_batch_size(16, 3, 2)


def test_datamodule_split_and_batches(sidecar_data):
    dm = CaptionedImageDataModule(str(sidecar_data), resolution=16, global_batch_size=4, val_fraction=0.25)
    dm.setup("fit")
    assert len(dm.train_set) == 12 and len(dm.val_set) == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and len(batch["captions"]) == 4
    assert all(isinstance(c, str) and c for c in batch["captions"])
