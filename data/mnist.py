"""``mnist``: MNIST via ``torchvision.datasets.MNIST`` (60k train / 10k test, 1x28x28, 10 classes).

On disk (torchvision's raw layout): ``<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.
``download=True`` runs torchvision's downloader (which also verifies the archives' md5).
Validation: ``val_size`` (default 5000) training images held out with a seeded permutation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import CertDataModule


class MNISTDataModule(CertDataModule):
    name: ClassVar[str] = "mnist"
    mean: ClassVar[tuple[float, ...]] = (0.1307,)
    std: ClassVar[tuple[float, ...]] = (0.3081,)
    in_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    num_classes: ClassVar[int] = 10
    default_val_size: ClassVar[int] = 5000
    default_augment: ClassVar[bool] = False
    crop_padding: ClassVar[int] = 2
    hflip: ClassVar[bool] = False
    required_files: ClassVar[tuple[str, ...]] = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    source_url: ClassVar[str] = "the torchvision MNIST mirrors"
    #: torchvision class name, also the folder name under data_dir
    tv_class: ClassVar[str] = "MNIST"

    def search_dirs(self) -> list[Path]:
        return [self.data_dir / self.tv_class / "raw"]

    def _tv(self, train: bool, download: bool = False) -> Any:
        import torchvision.datasets as tvd

        return getattr(tvd, self.tv_class)(str(self.data_dir), train=train, download=download)

    def download_data(self) -> None:
        self._tv(train=True, download=True)
        self._tv(train=False, download=True)

    def load_split(self, location: Path, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self._tv(train=split == "train")
        return ds.data.unsqueeze(1), ds.targets
