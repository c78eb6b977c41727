"""LightningDataModules of certtrain, one module per dataset (see ``data/README.md``).

``DATAMODULES`` maps the config name (``conf/dataset/<name>.yaml``) to the class;
``get_datamodule(name, **kwargs)`` instantiates one.  Two kinds:

* ``IMAGE_DATAMODULES`` (:class:`CertDataModule`): images in [0, 1] (no normalization); each
  class exposes ``mean``, ``std``, ``in_shape`` and ``num_classes``.
* ``TEXT_DATAMODULES`` (:class:`TextDataModule`, ``is_text = True``): token ids plus the ids of
  each token's WordNet synonym candidates, for certification against word substitutions.
"""

from __future__ import annotations

from typing import Any

from .base import CertDataModule, DatasetNotFoundError, TensorImageDataset, default_data_dir
from .cifar10 import CIFAR10DataModule
from .digits import DigitsDataModule
from .fashion_mnist import FashionMNISTDataModule
from .imagenet64 import ImageNet64DataModule
from .mnist import MNISTDataModule
from .movie_reviews import MovieReviewsDataModule
from .sst2 import SST2DataModule
from .svhn import SVHNDataModule
from .text import TextDataModule, TextDataset
from .tinyimagenet import TinyImageNetDataModule

IMAGE_DATAMODULES: dict[str, type[CertDataModule]] = {
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
TEXT_DATAMODULES: dict[str, type[TextDataModule]] = {cls.name: cls for cls in (MovieReviewsDataModule, SST2DataModule)}
DATAMODULES: dict[str, type[CertDataModule] | type[TextDataModule]] = {**IMAGE_DATAMODULES, **TEXT_DATAMODULES}


def get_datamodule(name: str, **kwargs: Any) -> CertDataModule | TextDataModule:
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
    "IMAGE_DATAMODULES",
    "ImageNet64DataModule",
    "MNISTDataModule",
    "MovieReviewsDataModule",
    "SST2DataModule",
    "SVHNDataModule",
    "TEXT_DATAMODULES",
    "TensorImageDataset",
    "TextDataModule",
    "TextDataset",
    "TinyImageNetDataModule",
    "default_data_dir",
    "get_datamodule",
]
