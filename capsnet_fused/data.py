"""MNIST and Fashion-MNIST from the standard IDX files, without torchvision.

Images are kept as uint8 tensors [N, 1, H, W] and labels as int64 [N]; batches are converted to
float in [0, 1] and augmented (random shifts) on the batched tensor in the training loop, so
augmentation is fast, seeded by one torch.Generator and independent of --num-workers.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

DATASETS = ("mnist", "fashion-mnist")
SPLITS = ("train", "test")
NUM_CLASSES = 10

# Gzipped IDX files and the md5 of each file as published (the checksums torchvision and the
# Fashion-MNIST repository list). Only downloads are checked against them: Debian's
# dataset-fashion-mnist recompresses the files, so local files are checked by structure.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
# yann.lecun.com is often down; the PyTorch mirror serves the same files.
MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
# Where Debian's dataset-fashion-mnist package installs the files.
SYSTEM_DIRS = {"mnist": (), "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),)}
DEFAULT_DATA_DIR = Path("data")

_GZIP_MAGIC = b"\x1f\x8b"
# IDX type codes -> numpy big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

Downloader = Callable[[str, Path, float], None]


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are neither on disk nor downloadable."""


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it is gzip data (whatever its name)."""
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) into an array of its declared shape and type.

    Raises ValueError naming the file when the magic number, the dimensions or the size do not
    agree: a truncated file is never read as a smaller dataset.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes, too short for an IDX header (4 bytes)")
    zero, type_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or type_code not in _IDX_DTYPES or ndim < 1:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()}; expected 0x0000TTNN with a known "
            f"type TT (08 for uint8) and NN >= 1 dimensions"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, expected {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: file {what}: dimensions {dims} need {expected} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def urllib_download(url: str, dest: Path, timeout: float) -> None:
    """Fetch url into dest with urllib (fails fast when the host cannot be reached)."""
    with urllib.request.urlopen(url, timeout=timeout) as response, dest.open("wb") as out:
        while block := response.read(1 << 20):
            out.write(block)


def _where_to_put(dataset: str, data_dir: Path) -> str:
    names = ", ".join(name for split in SPLITS for name in FILES[split])
    hint = (
        " (on Debian: apt-get install dataset-fashion-mnist)" if dataset == "fashion-mnist" else ""
    )
    return f"put {names} (gzipped or not) in {data_dir}{hint}"


def download_dataset(
    dataset: str,
    data_dir: str | os.PathLike,
    *,
    downloader: Downloader | None = None,
    timeout: float = 10.0,
) -> Path:
    """Download the four files of `dataset` into data_dir, each checked against its md5.

    Returns data_dir. Raises DatasetNotFoundError saying where to put the files when no mirror
    delivers a file with the right checksum. Files already present with the right checksum are
    kept; a download lands under a temporary name and is renamed only once verified.
    """
    _check_dataset(dataset)
    download = downloader or urllib_download
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, md5 in MD5[dataset].items():
        target = data_dir / name
        if target.exists() and _md5(target) == md5:
            continue
        tmp = data_dir / f".{name}.part"
        failures = []
        for mirror in MIRRORS[dataset]:
            url = mirror + name
            try:
                download(url, tmp, timeout)
                got = _md5(tmp)
                if got != md5:
                    failures.append(f"{url}: md5 {got}, expected {md5}")
                    continue
                os.replace(tmp, target)
                break
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                failures.append(f"{url}: {exc}")
            finally:
                tmp.unlink(missing_ok=True)
        else:
            raise DatasetNotFoundError(
                f"{dataset} is not on disk and could not be downloaded "
                f"({'; '.join(failures)}); {_where_to_put(dataset, data_dir)}"
            )
    return data_dir


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def _find_file(directory: Path, gz_name: str) -> Path | None:
    for name in (gz_name, gz_name[: -len(".gz")]):
        if (directory / name).is_file():
            return directory / name
    return None


def candidate_dirs(dataset: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """Folders searched, in order: data_dir and data_dir/<dataset> when data_dir is given;
    else ./data, ./data/<dataset> and the system folders."""
    _check_dataset(dataset)
    if data_dir is not None:
        return [Path(data_dir), Path(data_dir) / dataset]
    return [DEFAULT_DATA_DIR, DEFAULT_DATA_DIR / dataset, *SYSTEM_DIRS[dataset]]


def _missing_files(directory: Path) -> list[str]:
    names = [name for split in SPLITS for name in FILES[split]]
    return [name for name in names if _find_file(directory, name) is None]


def find_dataset_dir(
    dataset: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    downloader: Downloader | None = None,
) -> Path:
    """The folder holding all four files of `dataset`, downloading them when absent.

    A given data_dir is the only place looked at (data_dir itself or data_dir/<dataset>): a
    mistyped folder is an error naming it and the missing files (or, with download=True, where
    the download goes), never a silent switch to another copy. Without data_dir, ./data,
    ./data/<dataset> and the system folders are searched, and downloads go to ./data/<dataset>.
    """
    dirs = candidate_dirs(dataset, data_dir)
    for directory in dirs:
        if not _missing_files(directory):
            return directory
    if download:
        return download_dataset(dataset, dirs[1], downloader=downloader)
    if data_dir is not None:
        missing = ", ".join(_missing_files(dirs[0]))
        raise DatasetNotFoundError(
            f"{dataset} files missing in {dirs[0]} (and in {dirs[1]}): {missing}; "
            f"{_where_to_put(dataset, dirs[0])}, or give no data folder (--data-dir) to search "
            f"./data and the system folders and download"
        )
    searched = ", ".join(str(d) for d in dirs)
    raise DatasetNotFoundError(
        f"{dataset} not found in {searched}; {_where_to_put(dataset, dirs[0])}"
    )


def load_arrays(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """images uint8 [N, H, W] and labels uint8 [N] of one split, checked against each other."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    directory = Path(directory)
    paths = []
    for name in FILES[split]:
        path = _find_file(directory, name)
        if path is None:
            raise DatasetNotFoundError(f"{directory / name} (or its unzipped form) not found")
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if len(images) == 0:
        raise ValueError(f"{paths[0]}: holds 0 images")
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{paths[0]}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"{paths[1]}: expected uint8 labels [N], got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise ValueError(f"{paths[1]}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")
    return images, labels


class ImageDataset(Dataset):
    """In-memory images uint8 [N, 1, H, W] and labels int64 [N]; item -> (image, label).

    `source` is the folder the files were read from (None when built from tensors).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, source: Path | None = None
    ) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(
                f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(f"expected labels [N={images.shape[0]}], got {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.source = source

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def load_dataset(
    dataset: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    download: bool = True,
    downloader: Downloader | None = None,
) -> ImageDataset:
    """One split of MNIST or Fashion-MNIST; `limit` keeps the first `limit` samples.

    The folder is found by find_dataset_dir (data_dir alone when given) and kept as `source`.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    directory = find_dataset_dir(dataset, data_dir, download=download, downloader=downloader)
    images, labels = load_arrays(directory, split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images_t = torch.from_numpy(images.copy()).unsqueeze(1)
    return ImageDataset(images_t, torch.from_numpy(labels.astype(np.int64)), directory)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, C, H, W] -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def random_shift(
    images: torch.Tensor, max_shift: int = 2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Shift each image [B, C, H, W] by its own random (dy, dx) in [-max_shift, max_shift].

    Vacated pixels are zero (zero padding, as in the paper); one gather for the whole batch.
    The shifts are drawn on the CPU from `generator`, so they do not depend on the device.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got {tuple(images.shape)}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0 or images.shape[0] == 0:
        return images
    batch, channels, height, width = images.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (2, batch), generator=generator)
    shifts = shifts.to(images.device)
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    # Output pixel (y, x) reads padded pixel (y - dy + p, x - dx + p). Indexed in [B, C, H, W]
    # order, so that the result has the standard strides: a permuted gather gave [B, 1, H, W]
    # channels-last strides, which made conv1's weight gradient channels-last and DDP warn
    # that grad strides do not match its buckets.
    rows = torch.arange(height, device=images.device) + (max_shift - shifts[0])[:, None]
    cols = torch.arange(width, device=images.device) + (max_shift - shifts[1])[:, None]
    index = torch.arange(batch, device=images.device)[:, None, None, None]
    channel = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[index, channel, rows[:, None, :, None], cols[:, None, None, :]]


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start after the first `start` samples of its shard.

    The order is a function of (seed, epoch) alone, so a run resumed mid-epoch sees the same
    remaining samples. Built with explicit num_replicas and rank, so it also serves a single
    process without a process group.
    """

    def __init__(
        self,
        dataset: Sequence,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` samples of this shard in the coming epoch."""
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return max(super().__len__() - self.start, 0)

    def real_samples(self, begin: int, end: int) -> int:
        """How many of this shard's positions [begin, end) of an epoch (counted from its
        first sample, whatever set_start says) hold distinct dataset samples.

        DistributedSampler pads the epoch's order by repeating its first samples until every
        shard has the same length; the padding is the tail of the order, so the real samples
        of a batch are its first real_samples(...) ones.
        """
        if self.drop_last:
            return max(end - begin, 0)
        # Shard position p holds position rank + p * num_replicas of the padded order.
        real_positions = max(-(-(len(self.dataset) - self.rank) // self.num_replicas), 0)
        return max(min(end, real_positions) - begin, 0)
