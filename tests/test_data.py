"""IDX reading, dataset lookup and download (mocked, no network), shifts, sampler."""

from __future__ import annotations

import gzip
import hashlib
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from capsnet_fused import data
from capsnet_fused.data import (
    DatasetNotFoundError,
    ImageDataset,
    ResumableSampler,
    find_dataset_dir,
    load_arrays,
    load_dataset,
    random_shift,
    read_idx,
)


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_split(directory: Path, split: str, images: np.ndarray, labels: np.ndarray, gz=True):
    image_name, label_name = data.FILES[split]
    strip = (lambda n: n) if gz else (lambda n: n[: -len(".gz")])
    write_idx(directory / strip(image_name), images, gz)
    write_idx(directory / strip(label_name), labels, gz)


def synthetic(n: int, size: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def write_dataset(directory: Path, gz: bool = True, n_train: int = 12, n_test: int = 5) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_split(directory, "train", *synthetic(n_train, seed=1), gz=gz)
    write_split(directory, "test", *synthetic(n_test, seed=2), gz=gz)
    return directory


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_round_trip(tmp_path, gz):
    images, labels = synthetic(7)
    assert np.array_equal(read_idx(write_idx(tmp_path / "i", images, gz)), images)
    assert np.array_equal(read_idx(write_idx(tmp_path / "l", labels, gz)), labels)
    wide = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    (tmp_path / "w").write_bytes(idx_bytes(wide, 0x0C))
    assert np.array_equal(read_idx(tmp_path / "w"), wide)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_truncated_file_is_an_error_naming_it(tmp_path, gz):
    raw = idx_bytes(synthetic(4)[0])
    path = tmp_path / "train-images-idx3-ubyte"
    # A raw file cut short, or a gzip stream cut short (its decompressed size is then wrong too).
    path.write_bytes(gzip.compress(raw)[:-30] if gz else raw[:-5])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte") as info:
        read_idx(path)
    assert "truncated" in str(info.value)


def test_gzip_of_a_truncated_idx_is_an_error(tmp_path):
    path = tmp_path / "t.gz"
    path.write_bytes(gzip.compress(idx_bytes(synthetic(4)[0])[:-1]))
    with pytest.raises(ValueError, match=r"t\.gz: file truncated.*need 160 bytes, got 159"):
        read_idx(path)


def test_trailing_bytes_and_short_header_are_errors(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(synthetic(2)[1]) + b"\0")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(path)
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(path)


@pytest.mark.parametrize("magic", [b"\x00\x01\x08\x03", b"\x00\x00\x07\x03", b"\x00\x00\x08\x00"])
def test_wrong_magic_is_an_error(tmp_path, magic):
    raw = bytearray(idx_bytes(synthetic(2)[0]))
    raw[:4] = magic
    path = tmp_path / "bad-idx"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad-idx: bad IDX magic number"):
        read_idx(path)


def test_mismatched_counts_and_bad_labels_are_errors(tmp_path):
    images, labels = synthetic(6)
    write_split(tmp_path, "train", images, labels[:5])
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        load_arrays(tmp_path, "train")
    write_split(tmp_path, "train", images, np.full(6, 10, dtype=np.uint8))
    with pytest.raises(ValueError, match="label 10 outside 0..9"):
        load_arrays(tmp_path, "train")
    write_split(tmp_path, "train", images[:, 0], labels)
    with pytest.raises(ValueError, match=r"expected uint8 images \[N, H, W\]"):
        load_arrays(tmp_path, "train")


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_load_dataset_from_data_dir(tmp_path, gz):
    write_dataset(tmp_path / "fashion-mnist", gz=gz)
    # data_dir/<dataset> is searched as well as data_dir itself.
    train = load_dataset("fashion-mnist", "train", tmp_path, download=False)
    images, labels = synthetic(12, seed=1)
    assert train.images.dtype == torch.uint8 and train.images.shape == (12, 1, 6, 6)
    assert torch.equal(train.images[:, 0], torch.from_numpy(images))
    assert torch.equal(train.labels, torch.from_numpy(labels).long())
    test = load_dataset("fashion-mnist", "test", tmp_path, limit=3, download=False)
    assert len(test) == 3 and test.labels.dtype == torch.int64
    image, label = test[1]
    assert image.shape == (1, 6, 6) and label == test.labels[1]


def test_missing_dataset_without_download_says_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", ())
    with pytest.raises(DatasetNotFoundError) as info:
        find_dataset_dir("fashion-mnist", tmp_path, download=False)
    message = str(info.value)
    assert f"in {tmp_path}" in message and "train-images-idx3-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_unreachable_network_fails_fast_with_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DIRS, "mnist", ())
    tried = []

    def offline(url, dest, timeout):
        tried.append(url)
        raise urllib.error.URLError("Name or service not known")

    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", "train", tmp_path, downloader=offline)
    # Both MNIST mirrors are tried for the first file, then the error names the folder.
    assert tried == [m + "train-images-idx3-ubyte.gz" for m in data.MIRRORS["mnist"]]
    assert f"in {tmp_path / 'mnist'}" in str(info.value)
    assert "Name or service not known" in str(info.value)
    assert not list((tmp_path / "mnist").iterdir())


def test_download_rejects_a_bad_checksum_and_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", ())

    def corrupt(url, dest, timeout):
        dest.write_bytes(b"not the file")

    with pytest.raises(DatasetNotFoundError, match="md5 .*, expected 8d4fb7e6c68d591d"):
        find_dataset_dir("fashion-mnist", tmp_path, downloader=corrupt)
    assert not list((tmp_path / "fashion-mnist").iterdir())


def test_download_with_matching_checksums_then_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", ())
    served = write_dataset(tmp_path / "server")
    payloads = {p.name: p.read_bytes() for p in served.iterdir()}
    md5 = {name: hashlib.md5(b).hexdigest() for name, b in payloads.items()}
    monkeypatch.setitem(data.MD5, "fashion-mnist", md5)
    fetched = []

    def fake(url, dest, timeout):
        fetched.append(url)
        dest.write_bytes(payloads[url.rsplit("/", 1)[1]])

    train = load_dataset("fashion-mnist", "train", tmp_path / "data", downloader=fake)
    assert len(fetched) == 4 and all(
        u.startswith(data.MIRRORS["fashion-mnist"][0]) for u in fetched
    )
    assert torch.equal(train.images[:, 0], torch.from_numpy(synthetic(12, seed=1)[0]))
    # Verified files already on disk are not fetched again.
    load_dataset("fashion-mnist", "test", tmp_path / "data", downloader=fake)
    assert len(fetched) == 4


def test_image_dataset_validates():
    with pytest.raises(ValueError, match=r"uint8 images \[N, C, H, W\]"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2))
    with pytest.raises(ValueError, match=r"labels \[N=2\]"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3))


def _shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """image [C, H, W] moved down by dy and right by dx, zero filled (by slicing)."""
    out = torch.zeros_like(image)
    height, width = image.shape[-2:]
    out[:, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = image[
        :, max(-dy, 0) : height - max(dy, 0), max(-dx, 0) : width - max(dx, 0)
    ]
    return out


def test_random_shift_is_a_zero_padded_shift_of_at_most_max_shift():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(60, 2, 7, 9) + 0.5  # no zeros: each shift is identifiable
    shifted = random_shift(images, 2, generator=gen)
    assert shifted.shape == images.shape and shifted.dtype == images.dtype
    seen = set()
    for image, out in zip(images, shifted, strict=True):
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(out, _shift(image, dy, dx))
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    # 60 draws from 25 equally likely shifts: all but a few appear.
    assert len(seen) >= 18


def test_random_shift_is_seeded_and_uint8_safe():
    images = torch.randint(1, 256, (16, 1, 28, 28), dtype=torch.uint8)
    first = random_shift(images, 2, torch.Generator().manual_seed(3))
    again = random_shift(images, 2, torch.Generator().manual_seed(3))
    other = random_shift(images, 2, torch.Generator().manual_seed(4))
    assert first.dtype == torch.uint8 and torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(random_shift(images, 0), images)
    with pytest.raises(ValueError, match="max_shift must be >= 0"):
        random_shift(images, -1)


def test_resumable_sampler_partitions_and_resumes():
    dataset = list(range(23))
    whole = ResumableSampler(dataset, 1, 0, seed=5)
    whole.set_epoch(2)
    order = list(whole)
    assert sorted(order) == dataset and order != dataset
    shards = [ResumableSampler(dataset, 2, r, seed=5) for r in range(2)]
    for shard in shards:
        shard.set_epoch(2)
    # Two replicas interleave the single-process order (padded to an even length).
    assert [i for pair in zip(*map(list, shards), strict=True) for i in pair][:23] == order
    resumed = ResumableSampler(dataset, 1, 0, seed=5)
    resumed.set_epoch(2)
    resumed.set_start(8)
    assert list(resumed) == order[8:] and len(resumed) == 15
    whole.set_epoch(3)
    assert list(whole) != order


def test_a_split_with_no_images_is_an_error_naming_the_file(tmp_path):
    images, labels = synthetic(0)
    write_split(tmp_path, "train", images, labels)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: holds 0 images"):
        load_arrays(tmp_path, "train")


def test_only_an_absent_data_dir_searches_the_default_folders(tmp_path, monkeypatch):
    full = write_dataset(tmp_path / "system")
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", (full,))
    monkeypatch.chdir(tmp_path)  # no ./data here
    assert find_dataset_dir("fashion-mnist", None, download=False) == full
    (tmp_path / "typo").mkdir()
    with pytest.raises(DatasetNotFoundError, match=f"files missing in {tmp_path / 'typo'}"):
        find_dataset_dir("fashion-mnist", tmp_path / "typo", download=False)
    dataset = load_dataset("fashion-mnist", "test", None, download=False)
    assert dataset.source == full and len(dataset) == 5


def test_real_samples_leave_out_the_distributed_padding():
    dataset = list(range(23))
    for replicas in (1, 2, 3, 4):
        shards = [ResumableSampler(dataset, replicas, r, seed=5) for r in range(replicas)]
        counts = [s.real_samples(0, len(s)) for s in shards]
        assert sum(counts) == 23, replicas
        # Per batch: only the shard's tail is padding.
        for shard in shards:
            per_batch = [shard.real_samples(b, b + 4) for b in range(0, len(shard), 4)]
            assert sum(per_batch) == shard.real_samples(0, len(shard))
    shard = ResumableSampler(dataset, 2, 1, seed=5)  # 12 positions, the last one padding
    assert shard.real_samples(8, 12) == 3 and shard.real_samples(0, 8) == 8
