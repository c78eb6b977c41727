"""Shared base for all certtrain datamodules.

Conventions (every datamodule in ``data/``):

* Inputs are in **pixel space [0, 1]**: uint8 images are divided by 255 (exactly what
  ``torchvision.transforms.ToTensor`` does), nothing else.  There is **no normalization** in
  the data pipeline: perturbation radii (``eps = 8/255`` ...) are therefore in pixel units and
  the model prepends a normalization layer built from the datamodule's ``mean`` / ``std``.
* Class attributes ``mean``, ``std`` (per-channel tuples), ``in_shape`` ``(C, H, W)`` and
  ``num_classes`` describe the data; the constructor accepts ``in_shape`` / ``num_classes`` only
  to *check* them (so a Hydra config can carry them for other configs to interpolate).
* Images are held in memory as one uint8 tensor ``(N, C, H, W)`` and converted per item; this is
  equivalent to ``ToTensor()`` on the PIL image but avoids the PIL round trip.
* The official training set is split into train / val with a seeded permutation
  (``val_size`` images held out), so model selection never touches the test set.  The test set is
  the official test set (for TinyImageNet / ImageNet64: the official validation set).

Data directory: the ``data_dir`` argument, else ``$CERTTRAIN_DATA_DIR``, else ``./data_cache``
(relative to the working directory at construction time; stored as an absolute path).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

DATA_DIR_ENV = "CERTTRAIN_DATA_DIR"
DEFAULT_DATA_DIR = "data_cache"

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "CertDataModule",
    "DatasetNotFoundError",
    "TensorImageDataset",
    "default_data_dir",
    "interleave_by_class",
]


def default_data_dir() -> Path:
    """``$CERTTRAIN_DATA_DIR`` if set (and non-empty), else ``./data_cache``; absolute."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env if env else DEFAULT_DATA_DIR).expanduser().resolve()


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not on disk (and were not / could not be downloaded).

    Attributes: ``dataset`` (config name), ``searched`` (directories looked in), ``expected``
    (paths / patterns of the files expected), ``missing`` (those of them that are absent),
    ``hint`` (how to get them).
    """

    def __init__(
        self,
        dataset: str,
        searched: Sequence[Path | str],
        expected: Sequence[str],
        missing: Sequence[str] = (),
        hint: str = "",
        reason: str = "not found",
    ) -> None:
        self.dataset = dataset
        self.searched = [Path(p) for p in searched]
        self.expected = list(expected)
        self.missing = list(missing)
        self.hint = hint
        lines = [f"Dataset {dataset!r} {reason}."]
        lines.append("  searched: " + ", ".join(str(p) for p in self.searched))
        lines.append("  expected files:")
        lines += [f"    {f}" for f in self.expected]
        if self.missing and self.missing == self.expected:
            lines.append("  missing: all of them")
        elif self.missing:
            lines.append("  missing: " + ", ".join(self.missing))
        if hint:
            lines.append("  how to get them: " + hint)
        super().__init__("\n".join(lines))


def interleave_by_class(labels: np.ndarray) -> np.ndarray:
    """Indices ordering ``labels`` round-robin over classes (stable within a class).

    Used for datasets stored class by class, so that "the first N examples" is a class-balanced
    sample rather than N images of the first class.
    """
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    rank = np.empty(len(labels), dtype=np.int64)
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank[order] = np.arange(len(labels)) - starts
    return np.lexsort((labels, rank))


class TensorImageDataset(Dataset):
    """In-memory image dataset returning ``(x, y)``, ``x`` float32 ``(C, H, W)`` in [0, 1].

    ``images``: ``(N, C, H, W)`` integer tensor (uint8), divided by ``scale`` per item.
    ``indices``: optional view into ``images`` (no copy), e.g. the train / val split.
    ``transform``: optional callable on the float tensor (augmentation; no normalization).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor | np.ndarray | None = None,
        scale: float = 255.0,
        transform: Any = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.indices = None if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.scale = float(scale)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images) if self.indices is None else len(self.indices)

    def _index(self, i: int) -> int:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if self.indices is None else int(self.indices[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self._index(i)
        x = self.images[j].to(torch.float32) / self.scale
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[j])

    @property
    def targets(self) -> torch.Tensor:
        """Labels of the examples in this dataset (in dataset order)."""
        return self.labels if self.indices is None else self.labels[self.indices]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All examples as ``(x, y)`` tensors, without the transform (e.g. for certification)."""
        imgs = self.images if self.indices is None else self.images[self.indices]
        return imgs.to(torch.float32) / self.scale, self.targets.clone()


def _as_shape(v: Any) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in v)
    except TypeError as e:
        raise ValueError(f"in_shape must be a sequence of ints (C, H, W), got {v!r}") from e


def _opt_pos_int(name: str, v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or int(v) != v or int(v) <= 0:
        raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
    return int(v)


class CertDataModule(pl.LightningDataModule):
    """Base LightningDataModule: seeded train/val split, subsets, checks, dataloaders.

    Args:
        data_dir: root directory of the datasets (see module docstring for the default).
        batch_size: training batch size.
        eval_batch_size: batch size of the val / test loaders (default: ``batch_size``).
        num_workers: DataLoader workers (``persistent_workers`` is on when > 0).
        val_size: number of *training* images held out (seeded) as the validation split
            (default: the dataset's ``default_val_size``); 0 gives an empty val loader.
        train_subset: if set, use only the first ``train_subset + val_size`` images of the
            official training set; ``val_size`` of them are held out, so the train split has
            exactly ``train_subset`` images (quick tests).
        test_subset: if set, use only the first ``test_subset`` test images.
        seed: seed of the *data split* (train/val, and for ``digits`` also test).  Keep it fixed
            across runs so that val / test sets are comparable; it does not affect shuffling.
        download: if True, ``prepare_data`` downloads missing files with the real downloader
            (torchvision).  Default False: missing files raise :class:`DatasetNotFoundError`.
        augment: training augmentation (random crop with ``crop_padding`` zero padding, plus a
            horizontal flip where the dataset allows it).  None: the dataset's default.
        in_shape, num_classes: optional; checked against the dataset (``ValueError`` on mismatch).
        pin_memory: DataLoader ``pin_memory``.
        drop_last: drop the last incomplete training batch.
    """

    # --- per-dataset class attributes -------------------------------------------------
    name: ClassVar[str] = ""
    mean: ClassVar[tuple[float, ...]] = ()
    std: ClassVar[tuple[float, ...]] = ()
    in_shape: ClassVar[tuple[int, int, int]] = (0, 0, 0)
    num_classes: ClassVar[int] = 0
    default_val_size: ClassVar[int] = 5000
    default_augment: ClassVar[bool] = False
    crop_padding: ClassVar[int] = 4
    hflip: ClassVar[bool] = False
    pixel_scale: ClassVar[float] = 255.0
    #: relative paths that must exist in a search directory (simple datasets)
    required_files: ClassVar[tuple[str, ...]] = ()
    #: where the files come from (used in error messages)
    source_url: ClassVar[str] = ""

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int | None = None,
        train_subset: int | None = None,
        test_subset: int | None = None,
        seed: int = 0,
        download: bool = False,
        augment: bool | None = None,
        in_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        cls = type(self)
        if in_shape is not None and _as_shape(in_shape) != tuple(cls.in_shape):
            raise ValueError(
                f"dataset {cls.name!r} has in_shape {tuple(cls.in_shape)}, "
                f"but in_shape={_as_shape(in_shape)} was given"
            )
        if num_classes is not None and int(num_classes) != cls.num_classes:
            raise ValueError(
                f"dataset {cls.name!r} has {cls.num_classes} classes, but num_classes={num_classes} was given"
            )
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
        self.batch_size = _opt_pos_int("batch_size", batch_size)
        self.eval_batch_size = _opt_pos_int("eval_batch_size", eval_batch_size) or self.batch_size
        if self.batch_size is None:
            raise ValueError("batch_size must be a positive integer")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = int(num_workers)
        self.val_size = cls.default_val_size if val_size is None else int(val_size)
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        self.train_subset = _opt_pos_int("train_subset", train_subset)
        self.test_subset = _opt_pos_int("test_subset", test_subset)
        self.seed = int(seed)
        self.download = bool(download)
        self.augment = cls.default_augment if augment is None else bool(augment)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self.save_hyperparameters()

        self._train_set: TensorImageDataset | None = None
        self._val_set: TensorImageDataset | None = None
        self._test_set: TensorImageDataset | None = None

    # --- locating / downloading -------------------------------------------------------
    def search_dirs(self) -> list[Path]:
        """Directories searched (in order) for ``required_files``."""
        return [self.data_dir]

    def how_to_get(self) -> str:
        where = self.search_dirs()[0]
        src = f" from {self.source_url}" if self.source_url else ""
        return (
            f"run with dataset.download=true on a machine with internet access (torchvision downloads "
            f"it{src} into {where}), or copy the files there; or point dataset.data_dir "
            f"(Hydra: paths.data_dir, or env {DATA_DIR_ENV}) at a directory that contains them."
        )

    def not_found(
        self,
        searched: Sequence[Path] | None = None,
        expected: Sequence[str] | None = None,
        missing: Sequence[str] | None = None,
        reason: str = "not found",
        hint: str | None = None,
        base: Path | None = None,
    ) -> DatasetNotFoundError:
        """Build the error.  ``expected`` / ``missing`` are relative to ``base`` (default: the first
        searched directory) and reported as full paths; ``missing=None`` computes it."""
        searched = list(self.search_dirs() if searched is None else searched)
        expected = list(self.required_files if expected is None else expected)
        base = base if base is not None else (searched[0] if searched else self.data_dir)
        if missing is None:
            missing = [f for f in expected if not (base / f).exists()]
        return DatasetNotFoundError(
            self.name,
            searched,
            [str(base / f) for f in expected],
            [str(base / f) for f in missing],
            self.how_to_get() if hint is None else hint,
            reason,
        )

    def locate(self) -> Any:
        """Check that the files are on disk (cheap) and return where they are.

        Raises :class:`DatasetNotFoundError` otherwise.  The default looks for all
        ``required_files`` in each of :meth:`search_dirs` and returns the first that has them.
        """
        dirs = self.search_dirs()
        for d in dirs:
            if all((d / f).is_file() for f in self.required_files):
                return d
        raise self.not_found(dirs)

    def is_available(self) -> bool:
        try:
            self.locate()
        except DatasetNotFoundError:
            return False
        return True

    def download_data(self) -> None:
        """Download the dataset (called by :meth:`prepare_data` when ``download=True``)."""
        raise self.not_found(reason="cannot be downloaded automatically")

    def prepare_data(self) -> None:
        # Called by Lightning on one process only: download here, or fail early if missing.
        if self.download and not self.is_available():
            log.info("downloading dataset %r into %s", self.name, self.data_dir)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.download_data()
        self.locate()

    # --- loading ------------------------------------------------------------------------
    def load_split(self, location: Any, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(images uint8 (N, C, H, W), labels int64 (N,))`` of ``split`` ("train" = the
        official training set, "test" = the evaluation set), at least the first ``limit`` of
        them when ``limit`` is set (more may be returned; the caller truncates)."""
        raise NotImplementedError

    def _load_checked(self, location: Any, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.load_split(location, split, limit)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        y = torch.as_tensor(y, dtype=torch.long)
        if tuple(x.shape[1:]) != tuple(self.in_shape):
            raise ValueError(f"{self.name} {split}: images have shape {tuple(x.shape[1:])}, expected {self.in_shape}")
        if len(x) != len(y):
            raise ValueError(f"{self.name} {split}: {len(x)} images but {len(y)} labels")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(
                f"{self.name} {split}: labels in [{int(y.min())}, {int(y.max())}], expected [0, {self.num_classes})"
            )
        return x, y

    def train_transform(self) -> Any:
        if not self.augment:
            return None
        from torchvision import transforms as T

        ops: list[Any] = []
        if self.crop_padding > 0:
            ops.append(T.RandomCrop(tuple(self.in_shape[1:]), padding=self.crop_padding))
        if self.hflip:
            ops.append(T.RandomHorizontalFlip())
        return T.Compose(ops) if ops else None

    def setup(self, stage: str | None = None) -> None:
        need_fit = stage in (None, "fit", "validate") and self._train_set is None
        need_test = stage in (None, "test") and self._test_set is None
        if not (need_fit or need_test):
            return
        if self.download and not self.is_available():
            self.prepare_data()
        location = self.locate()  # fails fast, before any loading
        if need_fit:
            limit = None if self.train_subset is None else self.train_subset + self.val_size
            x, y = self._load_checked(location, "train", limit)
            if limit is not None and len(x) < limit:
                raise ValueError(
                    f"{self.name}: train_subset + val_size = {limit} but the training set has only {len(x)} images"
                )
            if self.val_size >= len(x):
                raise ValueError(f"{self.name}: val_size={self.val_size} >= {len(x)} training images")
            perm = np.random.default_rng(self.seed).permutation(len(x))
            val_idx = np.sort(perm[: self.val_size])
            train_idx = np.sort(perm[self.val_size :])
            self._train_set = TensorImageDataset(x, y, train_idx, self.pixel_scale, self.train_transform())
            self._val_set = TensorImageDataset(x, y, val_idx, self.pixel_scale)
        if need_test:
            x, y = self._load_checked(location, "test", self.test_subset)
            self._test_set = TensorImageDataset(x, y, None, self.pixel_scale)

    # --- datasets / loaders -------------------------------------------------------------
    @property
    def train_set(self) -> TensorImageDataset:
        if self._train_set is None:
            self.setup("fit")
        assert self._train_set is not None
        return self._train_set

    @property
    def val_set(self) -> TensorImageDataset:
        if self._val_set is None:
            self.setup("fit")
        assert self._val_set is not None
        return self._val_set

    @property
    def test_set(self) -> TensorImageDataset:
        if self._test_set is None:
            self.setup("test")
        assert self._test_set is not None
        return self._test_set

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, data_dir={str(self.data_dir)!r}, in_shape={self.in_shape}, "
            f"num_classes={self.num_classes}, val_size={self.val_size}, train_subset={self.train_subset}, "
            f"test_subset={self.test_subset}, seed={self.seed}, augment={self.augment})"
        )


def wrap_integrity_error(dm: CertDataModule, location: Path, err: Exception) -> DatasetNotFoundError:
    """torchvision says "not found or corrupted" although our existence check passed."""
    e = dm.not_found(
        [location],
        missing=[],
        reason=f"is present but failed torchvision's integrity (md5) check ({err})",
        hint="delete the corrupted files and re-download (dataset.download=true on a machine with "
        "internet access) or copy intact files there.",
    )
    return e
