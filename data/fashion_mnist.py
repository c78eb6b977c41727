"""``fashion_mnist``: Fashion-MNIST via ``torchvision.datasets.FashionMNIST`` (60k/10k, 1x28x28, 10 classes).

On disk: ``<data_dir>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (torchvision
layout, same file names as MNIST).  ``download=True`` runs torchvision's downloader.
"""

from __future__ import annotations

from typing import ClassVar

from .mnist import MNISTDataModule


class FashionMNISTDataModule(MNISTDataModule):
    name: ClassVar[str] = "fashion_mnist"
    mean: ClassVar[tuple[float, ...]] = (0.2860,)
    std: ClassVar[tuple[float, ...]] = (0.3530,)
    source_url: ClassVar[str] = "the torchvision Fashion-MNIST mirror"
    tv_class: ClassVar[str] = "FashionMNIST"
