"""``imagenet64``: downsampled ImageNet 64x64 (Chrabaszcz, Loshchilov & Hutter 2017), 1000 classes.

On disk: the official npz batches (from https://image-net.org/download-images.php, "Downsampled
ImageNet 64x64"; login required, so ``download=True`` cannot fetch them) in ``<data_dir>/imagenet64/``
(also accepted: ``Imagenet64/``, ``ImageNet64/``), either directly or in the folders the official
zips extract to::

    imagenet64/Imagenet64_train_part1_npz/train_data_batch_{1..5}.npz
    imagenet64/Imagenet64_train_part2_npz/train_data_batch_{6..10}.npz
    imagenet64/Imagenet64_val_npz/val_data.npz

Each file holds ``data`` (N, 12288) uint8 (channel-major: the 4096 R, then G, then B values of
a row-major 64x64 image) and ``labels`` (1-based, mapped to 0..999).  Train: 1,281,167 images;
test = the official val set (50,000); validation = ``val_size`` (default 10,000) images held out
of train.  The training set is read batch by batch into one preallocated uint8 array (about
15.7 GB of RAM for the full set); with ``train_subset`` only the needed leading batches are read.

Augmentation (default on): random crop 64 with 4 px zero padding + horizontal flip.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .base import CertDataModule

log = logging.getLogger(__name__)

ROOT_NAMES = ("imagenet64", "Imagenet64", "ImageNet64")
SUBDIRS = ("Imagenet64_train_part1_npz", "Imagenet64_train_part2_npz", "Imagenet64_val_npz")
TRAIN_FILES = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
VAL_FILE = "val_data.npz"
PIXELS = 3 * 64 * 64


def npz_num_rows(path: Path, key: str = "data") -> int:
    """Number of rows of array ``key`` in an .npz, read from the npy header (no data loaded)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(f)
    return int(shape[0])


def load_npz_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data (N, 12288) uint8, labels (N,) int64, 0-based)`` of one ImageNet64 npz batch."""
    with np.load(path) as f:
        data = np.asarray(f["data"])
        labels = np.asarray(f["labels"], dtype=np.int64).reshape(-1) - 1
    if data.ndim != 2 or data.shape[1] != PIXELS or data.dtype != np.uint8:
        raise ValueError(f"{path}: 'data' has shape {data.shape} / dtype {data.dtype}, expected (N, {PIXELS}) uint8")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def load_npz_batches(paths: list[Path], limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ImageNet64 npz batches (first ``limit`` images) into ``(N, 3, 64, 64)`` uint8."""
    total = 0
    needed: list[tuple[Path, int]] = []
    for p in paths:
        if limit is not None and total >= limit:
            break
        n = npz_num_rows(p)
        needed.append((p, n))
        total += n
    n_out = total if limit is None else min(total, limit)
    out = np.empty((n_out, PIXELS), dtype=np.uint8)
    labels = np.empty(n_out, dtype=np.int64)
    pos = 0
    for p, _ in needed:
        log.info("reading %s", p)
        d, lab = load_npz_batch(p)
        k = min(len(d), n_out - pos)
        out[pos : pos + k] = d[:k]
        labels[pos : pos + k] = lab[:k]
        pos += k
        del d
    if pos != n_out:
        raise ValueError(f"read {pos} images, the npz headers announced {n_out}")
    return torch.from_numpy(out).view(n_out, 3, 64, 64), torch.from_numpy(labels)


class ImageNet64DataModule(CertDataModule):
    name: ClassVar[str] = "imagenet64"
    mean: ClassVar[tuple[float, ...]] = (0.485, 0.456, 0.406)
    std: ClassVar[tuple[float, ...]] = (0.229, 0.224, 0.225)
    in_shape: ClassVar[tuple[int, int, int]] = (3, 64, 64)
    num_classes: ClassVar[int] = 1000
    default_val_size: ClassVar[int] = 10000
    default_augment: ClassVar[bool] = True
    crop_padding: ClassVar[int] = 4
    hflip: ClassVar[bool] = True
    required_files: ClassVar[tuple[str, ...]] = TRAIN_FILES + (VAL_FILE,)

    def search_dirs(self) -> list[Path]:
        return [self.data_dir / n for n in ROOT_NAMES]

    def how_to_get(self) -> str:
        return (
            "ImageNet requires a login, so dataset.download=true cannot fetch it: download "
            "Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip and Imagenet64_val_npz.zip from "
            f"https://image-net.org/download-images.php (Downsampled ImageNet 64x64) and unzip them into "
            f"{self.search_dirs()[0]} (files directly there or in the folders the zips create); or point dataset.data_dir (Hydra: paths.data_dir) at a directory "
            "whose imagenet64/ folder contains them."
        )

    @staticmethod
    def _find(root: Path, fname: str) -> Path | None:
        for d in (root, *(root / s for s in SUBDIRS)):
            if (d / fname).is_file():
                return d / fname
        if root.is_dir():  # any other one-level subfolder
            for d in sorted(root.iterdir()):
                if d.is_dir() and (d / fname).is_file():
                    return d / fname
        return None

    def locate(self) -> dict[str, Path]:
        best: tuple[Path, list[str]] | None = None
        for root in self.search_dirs():
            found = {f: self._find(root, f) for f in self.required_files}
            missing = [f for f, p in found.items() if p is None]
            if not missing:
                return {f: p for f, p in found.items() if p is not None}
            if best is None or (len(missing) < len(best[1]) and root.exists()):
                best = (root, missing)
        assert best is not None
        raise self.not_found(self.search_dirs(), list(self.required_files), best[1], base=best[0])

    def download_data(self) -> None:
        raise self.not_found(reason="cannot be downloaded automatically (ImageNet requires a login)")

    def load_split(self, location: dict[str, Path], split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        files = [location[f] for f in TRAIN_FILES] if split == "train" else [location[VAL_FILE]]
        return load_npz_batches(files, limit)
