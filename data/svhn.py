"""``svhn``: Street View House Numbers via ``torchvision.datasets.SVHN`` (3x32x32, 10 classes).

Splits: ``train`` (73,257) and ``test`` (26,032); the ``extra`` split is not used.  On disk:
``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB files with ``X`` (32, 32, 3, N) uint8 and ``y``
(N, 1), digit 0 stored as label 10 -> mapped to 0 by torchvision) in ``<data_dir>/SVHN/`` (where
``download=True`` puts them) or directly in ``<data_dir>/``.  torchvision verifies their md5.

Augmentation (default on): random crop 32 with 4 px zero padding.  No horizontal flip: mirrored
digits are not digits (2/5, 3/E ...), so flipping SVHN is generally avoided.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import CertDataModule, wrap_integrity_error


class SVHNDataModule(CertDataModule):
    name: ClassVar[str] = "svhn"
    mean: ClassVar[tuple[float, ...]] = (0.4377, 0.4438, 0.4728)
    std: ClassVar[tuple[float, ...]] = (0.1980, 0.2010, 0.1970)
    in_shape: ClassVar[tuple[int, int, int]] = (3, 32, 32)
    num_classes: ClassVar[int] = 10
    default_val_size: ClassVar[int] = 5000
    default_augment: ClassVar[bool] = True
    crop_padding: ClassVar[int] = 4
    hflip: ClassVar[bool] = False
    required_files: ClassVar[tuple[str, ...]] = ("train_32x32.mat", "test_32x32.mat")
    source_url: ClassVar[str] = "http://ufldl.stanford.edu/housenumbers/"

    def search_dirs(self) -> list[Path]:
        return [self.data_dir / "SVHN", self.data_dir]

    def _tv(self, root: Path, split: str, download: bool = False) -> Any:
        from torchvision.datasets import SVHN

        return SVHN(str(root), split=split, download=download)

    def download_data(self) -> None:
        root = self.search_dirs()[0]
        for split in ("train", "test"):
            self._tv(root, split, download=True)

    def load_split(self, location: Path, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            ds = self._tv(location, split)
        except RuntimeError as e:
            raise wrap_integrity_error(self, location, e) from e
        return torch.from_numpy(ds.data), torch.from_numpy(ds.labels)
