"""``cifar10``: CIFAR-10 via ``torchvision.datasets.CIFAR10`` (50k train / 10k test, 3x32x32, 10 classes).

On disk (the extracted python version, torchvision layout):
``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.  torchvision
verifies each file's md5.  ``download=True`` runs torchvision's downloader.

Augmentation (default on): random crop 32 with 4 px zero padding + random horizontal flip.
mean/std: the values used throughout the certified-training literature (auto_LiRPA, CROWN-IBP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import CertDataModule, wrap_integrity_error

BASE_FOLDER = "cifar-10-batches-py"


class CIFAR10DataModule(CertDataModule):
    name: ClassVar[str] = "cifar10"
    mean: ClassVar[tuple[float, ...]] = (0.4914, 0.4822, 0.4465)
    std: ClassVar[tuple[float, ...]] = (0.2023, 0.1994, 0.2010)
    in_shape: ClassVar[tuple[int, int, int]] = (3, 32, 32)
    num_classes: ClassVar[int] = 10
    default_val_size: ClassVar[int] = 5000
    default_augment: ClassVar[bool] = True
    crop_padding: ClassVar[int] = 4
    hflip: ClassVar[bool] = True
    required_files: ClassVar[tuple[str, ...]] = tuple(
        f"{BASE_FOLDER}/{f}"
        for f in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta")
    )
    source_url: ClassVar[str] = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

    def search_dirs(self) -> list[Path]:
        return [self.data_dir]

    def _tv(self, root: Path, train: bool, download: bool = False) -> Any:
        from torchvision.datasets import CIFAR10

        return CIFAR10(str(root), train=train, download=download)

    def download_data(self) -> None:
        self._tv(self.data_dir, train=True, download=True)

    def load_split(self, location: Path, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            ds = self._tv(location, train=split == "train")
        except RuntimeError as e:
            raise wrap_integrity_error(self, location, e) from e
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return x, torch.tensor(ds.targets, dtype=torch.long)
