"""The lazy per-case training data set, its on-disk cache and the streamed sum of the atlas mean."""

import os
import pickle
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch.utils.data import DataLoader

import atlasreg.data.case_dataset as case_dataset
from atlasreg.data.case_dataset import CaseDataset, CaseError, Preprocessing, StreamingSum
from atlasreg.data.cases import load_case, pairs_from_spec
from atlasreg.data.letter_b import write_letter_b_dataset
from atlasreg.errors import AtlasregError

PREP = Preprocessing(labels=(0, 255), size=(16, 16), spacing=(2.0, 2.0), ndim=2, spacing_override=(1.0, 1.0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cases")
    write_letter_b_dataset(tmp, 5, seed=0, size=32)
    return tmp


def pairs(folder):
    return pairs_from_spec({"images": str(folder), "image_suffix": "_img", "label_suffix": "_seg"})


def test_items_are_load_case_on_the_model_grid(folder):
    data = CaseDataset(pairs(folder), PREP)
    assert len(data) == 5 and data.names == ["B1", "B2", "B3", "B4", "B5"] and data.index_of("B4") == 3
    image, labelmap, index, mask = data[3]
    ref = load_case(folder / "B4_img.png", folder / "B4_seg.png", PREP)
    assert index == 3 and image.dtype == labelmap.dtype == torch.float32
    assert image.shape == (1, 16, 16) and labelmap.shape == (2, 16, 16)
    assert torch.equal(image, ref.image[0]) and torch.equal(labelmap, ref.labelmap[0])
    assert torch.equal(mask, ref.mask[0]) and mask.shape == (1, 16, 16)
    with pytest.raises(AtlasregError, match="'B9' is not in the data set"):
        data.index_of("B9")


def test_images_without_labelmaps_for_self_supervised_training(folder, tmp_path):
    """labelled=False (DeepATLAS pretraining): a folder of images alone is a data set; items have a
    labelmap of no channels, image and mask equal load_case's; labelmaps present are not read; the
    cache keeps such entries apart; a split without labelmaps is still refused for labelled use."""
    images = tmp_path / "images"
    images.mkdir()
    for i in (1, 2, 3):
        (images / f"B{i}_img.png").write_bytes((folder / f"B{i}_img.png").read_bytes())
    only_images = pairs_from_spec({"images": str(images), "image_suffix": "_img"}, need_labels=False)
    data = CaseDataset(only_images, PREP, tmp_path / "cache", labelled=False)
    image, labelmap, index, mask = data[1]
    ref = load_case(folder / "B2_img.png", None, PREP)
    assert labelmap.shape == (0, 16, 16) and index == 1 and data.names == ["B1", "B2", "B3"]
    assert torch.equal(image, ref.image[0]) and torch.equal(mask, ref.mask[0])
    assert torch.equal(data[1][0], image)  # from the cache now
    batch = next(iter(DataLoader(data, batch_size=3)))
    assert batch[1].shape == (3, 0, 16, 16) and batch[0].shape == (3, 1, 16, 16)
    labelled_pairs = CaseDataset(pairs(folder), PREP, tmp_path / "cache", labelled=False)
    assert labelled_pairs[1][1].shape == (0, 16, 16) and torch.equal(labelled_pairs[1][0], image)
    cfg = {"data": {"labels": {0: "bg", 255: "B"}, "spacing": [1, 1], "train": {"images": str(images),
           "image_suffix": "_img"}}, "model": {"size": [16, 16], "spacing": [2, 2], "ndim": 2}}
    assert len(CaseDataset.from_config(cfg, labelled=False)) == 3
    with pytest.raises(AtlasregError, match="no labelmap for this image"):
        CaseDataset.from_config(cfg)
    with pytest.raises(AtlasregError, match="no labelmap for this image"):
        CaseDataset(only_images, PREP)


def test_config_gives_the_same_settings():
    cfg = {"data": {"labels": {0: "bg", 255: "B"}, "spacing": [1, 1]},
           "model": {"size": [16, 16], "spacing": [2, 2], "ndim": 2}}
    assert Preprocessing.from_config(cfg) == PREP
    other = Preprocessing.from_config({**cfg, "model": {**cfg["model"], "size": [24, 16]}})
    assert other.key() != PREP.key()


def test_cache_serves_later_reads_without_the_files_code(folder, tmp_path, monkeypatch):
    data = CaseDataset(pairs(folder), PREP, tmp_path / "cache")
    first = [data[i] for i in range(len(data))]
    entries = sorted((tmp_path / "cache" / PREP.key()).glob("*.f32"))
    assert len(entries) == 5 and (tmp_path / "cache" / PREP.key() / "settings.json").is_file()
    assert not list((tmp_path / "cache").rglob(".tmp-*"))  # atomic writes leave nothing behind

    def no_reading(**kwargs):
        raise AssertionError("read from the files although cached")

    monkeypatch.setattr(case_dataset, "load_case", no_reading)
    again = pickle.loads(pickle.dumps(data))  # as a DataLoader worker gets it
    for (a_img, a_lab, *_), (b_img, b_lab, *_) in zip(first, (again[i] for i in range(5))):
        assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)


def test_a_changed_file_or_setting_never_reuses_a_stale_entry(folder, tmp_path):
    work = tmp_path / "data"
    work.mkdir()
    for f in ("B1_img.png", "B1_seg.png", "B2_img.png", "B2_seg.png"):
        (work / f).write_bytes((folder / f).read_bytes())
    cache = tmp_path / "cache"
    data = CaseDataset(pairs(work), PREP, cache)
    old_image = data[0][0]
    # B1 becomes B2's image (another size in bytes and a later modification time).
    (work / "B1_img.png").write_bytes((folder / "B2_img.png").read_bytes())
    os.utime(work / "B1_img.png", ns=(1, os.stat(work / "B1_seg.png").st_mtime_ns + 10 ** 9))
    fresh = CaseDataset(pairs(work), PREP, None)[0][0]
    assert not torch.equal(fresh, old_image) and torch.equal(data[0][0], fresh)
    bigger = Preprocessing(PREP.labels, (24, 24), PREP.spacing, 2, PREP.spacing_override)
    assert CaseDataset(pairs(work), bigger, cache)[1][1].shape == (2, 24, 24)
    assert len(list(cache.iterdir())) == 2  # one folder per settings


def test_a_damaged_entry_is_rebuilt(folder, tmp_path):
    data = CaseDataset(pairs(folder), PREP, tmp_path)
    image, labelmap, *_ = data[0]
    (entry,) = (tmp_path / PREP.key()).glob("*.f32")
    entry.write_bytes(b"not an array")
    assert torch.equal(data[0][0], image)
    np.zeros((3, 8, 8), np.float32).tofile(entry)  # another shape than these settings give
    assert torch.equal(data[0][1], labelmap)
    assert np.fromfile(entry, np.float32).size == 4 * 16 * 16


def test_workers_give_the_same_batches(folder, tmp_path):
    data = CaseDataset(pairs(folder), PREP, tmp_path)
    batches = [list(DataLoader(data, batch_size=2, num_workers=w)) for w in (0, 2)]
    assert len(batches[0]) == 3
    for a, b in zip(*batches):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert batches[0][2][2].tolist() == [4]


def test_errors_name_the_file_also_from_a_worker(folder, tmp_path):
    work = tmp_path / "data"
    work.mkdir()
    for f in ("B1_img.png", "B1_seg.png", "B2_img.png"):
        (work / f).write_bytes((folder / f).read_bytes())
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((34, 32), np.uint8)), str(work / "B2_seg.png"))
    data = CaseDataset(pairs(work), PREP, tmp_path / "cache")
    with pytest.raises(CaseError, match="size .* differs from image") as e:
        data[1]
    assert e.value.path == str(work / "B2_seg.png")
    with pytest.raises(CaseError) as e:
        list(DataLoader(data, batch_size=1, num_workers=1))
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{work / 'B2_seg.png'}: size ")
    (work / "B1_img.png").unlink()
    with pytest.raises(CaseError, match="file not found"):
        data[0]
    with pytest.raises(AtlasregError, match="no labelmap"):
        CaseDataset(pairs_from_spec({"images": str(work), "image_suffix": "_img", "label_suffix": "_seg"},
                                    need_labels=False) + [type(data.pairs[0])("X", work / "X.png", None)], PREP)


@pytest.mark.parametrize("cache", [False, True])
def test_a_degenerate_case_warns_once_per_file_not_every_epoch(folder, tmp_path, cache):
    work = tmp_path / "data"
    work.mkdir()
    for f in ("B1_img.png", "B1_seg.png", "B2_seg.png"):
        (work / f).write_bytes((folder / f).read_bytes())
    sitk.WriteImage(sitk.GetImageFromArray(np.full((32, 32), 9, np.uint8)), str(work / "B2_img.png"))
    data = CaseDataset(pairs(work), PREP, tmp_path / "cache" if cache else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(3):
            batches = list(DataLoader(data, batch_size=2, shuffle=True))
            assert torch.isfinite(batches[0][0]).all()
    assert [str(w.message) for w in caught] == [f"{work / 'B2_img.png'}: constant intensity 9: normalised to zeros"]
    sitk.WriteImage(sitk.GetImageFromArray(np.full((1, 32), 9, np.uint8)), str(work / "B2_img.png"))
    with pytest.raises(CaseError, match="image is 32x1 voxels; a 2D model needs at least 2") as e:
        data[1]
    assert e.value.path == str(work / "B2_img.png")


@pytest.mark.parametrize("shape", [(2, 16, 16), (3, 8, 8, 8), (1, 64, 64)])
def test_streaming_sum_equals_torch_mean_bit_for_bit(shape):
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 15, 16, 17, 40, 256, 300):
        rows = torch.randn(n, *shape, generator=gen) * 3 + 1
        acc = StreamingSum(n)
        for r in rows:
            acc.add(r[None])
        assert torch.equal(acc.total() / n, rows.mean(0, keepdim=True)), n
    running = torch.zeros(shape)
    for r in rows:  # a plain running sum is not what torch computes
        running += r
    assert not torch.equal(running / n, rows.mean(0))
    acc = StreamingSum(2)
    acc.add(torch.ones(3))
    with pytest.raises(ValueError, match="1 of the announced 2"):
        acc.total()
    acc.add(torch.ones(3))
    with pytest.raises(ValueError, match="more than"):
        acc.add(torch.ones(3))
