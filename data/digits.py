"""``digits``: scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``).

1797 grayscale 8x8 images with 17 gray levels (0..16), scaled by 1/16 to [0, 1]; 10 classes.
Needs no download and no files (the data ships with scikit-learn), which makes it the default
dataset for smoke tests.  There is no official split: a seeded permutation of the 1797 images
gives ``test_size`` test images (default 300), then ``val_size`` (default 200) of the remaining
1497 are held out as validation, leaving 1297 for training.  ``data_dir`` / ``download`` are
accepted (for a uniform config) and ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .base import CertDataModule


class DigitsDataModule(CertDataModule):
    name: ClassVar[str] = "digits"
    # computed on all 1797 images after /16 (no literature value for this toy set)
    mean: ClassVar[tuple[float, ...]] = (0.3053,)
    std: ClassVar[tuple[float, ...]] = (0.3760,)
    in_shape: ClassVar[tuple[int, int, int]] = (1, 8, 8)
    num_classes: ClassVar[int] = 10
    default_val_size: ClassVar[int] = 200
    default_augment: ClassVar[bool] = False
    crop_padding: ClassVar[int] = 1
    hflip: ClassVar[bool] = False
    pixel_scale: ClassVar[float] = 16.0
    NUM_IMAGES: ClassVar[int] = 1797

    def __init__(self, *args: Any, test_size: int = 300, **kwargs: Any) -> None:
        """``test_size``: number of the 1797 images used as test set; other args: see base."""
        super().__init__(*args, **kwargs)
        self.test_size = int(test_size)
        if not 0 < self.test_size < self.NUM_IMAGES:
            raise ValueError(f"test_size must be in (0, {self.NUM_IMAGES}), got {test_size}")
        self._arrays: tuple[torch.Tensor, torch.Tensor] | None = None

    def locate(self) -> Path | None:
        return None  # bundled with scikit-learn

    def download_data(self) -> None:
        return None

    def _all(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._arrays is None:
            from sklearn.datasets import load_digits

            d = load_digits()
            x = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8), 0..16
            y = torch.from_numpy(d.target.astype(np.int64))
            perm = torch.from_numpy(np.random.default_rng(self.seed).permutation(len(x)))
            self._arrays = (x[perm], y[perm])
        return self._arrays

    def load_split(self, location: Any, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._all()
        if split == "test":
            return x[: self.test_size], y[: self.test_size]
        return x[self.test_size :], y[self.test_size :]
