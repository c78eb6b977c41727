"""LightningDataModules of certtrain, one module per dataset (see ``data/README.md``).

``DATAMODULES`` maps the config name (``conf/dataset/<name>.yaml``) to the class;
``get_datamodule(name, **kwargs)`` instantiates one.  All yield images in [0, 1] (no
normalization); each class exposes ``mean``, ``std``, ``in_shape`` and ``num_classes``.
"""

from __future__ import annotations

from typing import Any

from .base import CertDataModule, DatasetNotFoundError, TensorImageDataset, default_data_dir
from .cifar10 import CIFAR10DataModule
from .digits import DigitsDataModule
from .fashion_mnist import FashionMNISTDataModule
from .imagenet64 import ImageNet64DataModule
from .mnist import MNISTDataModule
from .svhn import SVHNDataModule
from .tinyimagenet import TinyImageNetDataModule

DATAMODULES: dict[str, type[CertDataModule]] = {
    cls.name: cls
    for cls in (
        DigitsDataModule,
        MNISTDataModule,
        FashionMNISTDataModule,
        SVHNDataModule,
        CIFAR10DataModule,
        TinyImageNetDataModule,
        ImageNet64DataModule,
    )
}


def get_datamodule(name: str, **kwargs: Any) -> CertDataModule:
    """Instantiate the datamodule registered as ``name`` (e.g. ``"mnist"``) with ``kwargs``."""
    try:
        cls = DATAMODULES[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATAMODULES))}") from None
    return cls(**kwargs)


__all__ = [
    "DATAMODULES",
    "CIFAR10DataModule",
    "CertDataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageNet64DataModule",
    "MNISTDataModule",
    "SVHNDataModule",
    "TensorImageDataset",
    "TinyImageNetDataModule",
    "default_data_dir",
    "get_datamodule",
]
