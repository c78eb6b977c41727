"""``tinyimagenet``: Tiny ImageNet (200 classes, 3x64x64; 100k train, 10k labelled val).

Two on-disk sources are supported (``source="auto"`` tries them in this order):

1. ``folder`` -- the official ``tiny-imagenet-200.zip`` extracted into ``<data_dir>/tiny-imagenet-200/``::

       wnids.txt
       train/<wnid>/images/*.JPEG          (500 per class)
       val/val_annotations.txt             (file name <TAB> wnid <TAB> bbox...)
       val/images/*.JPEG

   ``download=True`` fetches the zip from http://cs231n.stanford.edu/tiny-imagenet-200.zip with
   torchvision's ``download_and_extract_archive`` (md5-checked).

2. ``hf`` -- a local copy of the Hugging Face dataset ``zh-plus/tiny-imagenet`` (parquet files
   with columns ``image`` {bytes, path} and ``label``) in ``<data_dir>/tiny-imagenet/``, e.g.
   ``tiny-imagenet/data/train-00000-of-00001-*.parquet`` and ``.../valid-00000-of-00001-*.parquet``
   (any ``train*.parquet`` / ``valid*.parquet`` below that folder).  Read with pyarrow, never
   downloaded from the Hub.

Labels: index of the wnid in ``sorted(wnids)`` (the ImageFolder convention); for the HF copy,
label names stored in the parquet metadata are remapped to the same order when they are wnids.
The official test split has no public labels, so the **test set is the official val split**
(10k) and validation is ``val_size`` (default 5000) images held out of train.  The training
set is ordered round-robin over classes so that ``train_subset`` gives a class-balanced sample.
JPEGs are decoded once into memory (uint8, about 1.2 GB for the full train set) with a thread
pool; grayscale images are converted to RGB.

Augmentation (default on): random crop 64 with 4 px zero padding + horizontal flip.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .base import CertDataModule, interleave_by_class

FOLDER = "tiny-imagenet-200"
HF_FOLDER = "tiny-imagenet"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ZIP_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
SOURCES = ("auto", "folder", "hf")

FOLDER_FILES = (
    f"{FOLDER}/wnids.txt",
    f"{FOLDER}/train/<wnid>/images/<wnid>_<k>.JPEG",
    f"{FOLDER}/val/val_annotations.txt",
    f"{FOLDER}/val/images/val_<k>.JPEG",
)
HF_FILES = (
    f"{HF_FOLDER}/**/train*.parquet (e.g. data/train-00000-of-00001-*.parquet from zh-plus/tiny-imagenet)",
    f"{HF_FOLDER}/**/valid*.parquet",
)


def _decode(data: bytes | str | Path) -> np.ndarray:
    from PIL import Image

    src = BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_images(items: list[Any], shape: tuple[int, int] = (64, 64)) -> torch.Tensor:
    """Decode JPEG files / bytes into one uint8 ``(N, 3, H, W)`` tensor (thread pool)."""
    out = np.empty((len(items), shape[0], shape[1], 3), dtype=np.uint8)

    def work(i: int) -> None:
        a = _decode(items[i])
        if a.shape != out.shape[1:]:
            raise ValueError(f"image {items[i] if not isinstance(items[i], bytes) else i} has shape {a.shape}, "
                             f"expected {out.shape[1:]}")
        out[i] = a

    n_threads = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(n_threads) as pool:
        list(pool.map(work, range(len(items)), chunksize=256))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class TinyImageNetDataModule(CertDataModule):
    name: ClassVar[str] = "tinyimagenet"
    mean: ClassVar[tuple[float, ...]] = (0.4802, 0.4481, 0.3975)
    std: ClassVar[tuple[float, ...]] = (0.2302, 0.2265, 0.2262)
    in_shape: ClassVar[tuple[int, int, int]] = (3, 64, 64)
    num_classes: ClassVar[int] = 200
    default_val_size: ClassVar[int] = 5000
    default_augment: ClassVar[bool] = True
    crop_padding: ClassVar[int] = 4
    hflip: ClassVar[bool] = True
    source_url: ClassVar[str] = URL

    def __init__(self, *args: Any, source: str = "auto", **kwargs: Any) -> None:
        """``source``: "auto" (folder layout, else HF parquet), "folder" or "hf"; other args: see base."""
        super().__init__(*args, **kwargs)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.source = source

    # --- locating -----------------------------------------------------------------------
    def search_dirs(self) -> list[Path]:
        dirs = []
        if self.source in ("auto", "folder"):
            dirs.append(self.data_dir / FOLDER)
        if self.source in ("auto", "hf"):
            dirs.append(self.data_dir / HF_FOLDER)
        return dirs

    def how_to_get(self) -> str:
        return (
            f"run with dataset.download=true on a machine with internet access (torchvision downloads and "
            f"extracts {URL} into {self.data_dir}), or copy the extracted {FOLDER}/ folder there, or put a "
            f"local copy of the HF dataset zh-plus/tiny-imagenet (parquet files) in {self.data_dir / HF_FOLDER}; "
            f"or point dataset.data_dir (Hydra: paths.data_dir) at a directory that contains them."
        )

    def _hf_files(self, root: Path) -> tuple[list[Path], list[Path]]:
        files = sorted(root.rglob("*.parquet")) if root.is_dir() else []

        def kind(p: Path) -> str:
            for part in (p.name.lower(), p.parent.name.lower()):
                if part.startswith("train"):
                    return "train"
                if part.startswith("valid") or part.startswith("val"):
                    return "valid"
            return ""

        return [p for p in files if kind(p) == "train"], [p for p in files if kind(p) == "valid"]

    def locate(self) -> tuple[str, Path]:
        folder = self.data_dir / FOLDER
        if self.source in ("auto", "folder"):
            if (
                (folder / "wnids.txt").is_file()
                and (folder / "train").is_dir()
                and (folder / "val" / "val_annotations.txt").is_file()
                and (folder / "val" / "images").is_dir()
            ):
                return "folder", folder
        hf = self.data_dir / HF_FOLDER
        if self.source in ("auto", "hf"):
            train, valid = self._hf_files(hf)
            if train and valid:
                return "hf", hf
        expected: tuple[str, ...] = ()
        missing: list[str] = []
        if self.source != "hf":
            expected += FOLDER_FILES
            missing += [
                rel
                for rel in (f"{FOLDER}/wnids.txt", f"{FOLDER}/train", f"{FOLDER}/val/val_annotations.txt",
                            f"{FOLDER}/val/images")
                if not (self.data_dir / rel).exists()
            ]
        if self.source != "folder":
            expected += HF_FILES
            missing += list(HF_FILES)
        raise self.not_found(self.search_dirs(), expected, missing, base=self.data_dir)

    def download_data(self) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(URL, download_root=str(self.data_dir), md5=ZIP_MD5)

    # --- loading ------------------------------------------------------------------------
    def load_split(self, location: tuple[str, Path], split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        kind, root = location
        if kind == "folder":
            items, labels = self._folder_index(root, split)
        else:
            items, labels = self._hf_index(root, split)
        labels = np.asarray(labels, dtype=np.int64)
        order = interleave_by_class(labels) if split == "train" else np.arange(len(labels))
        if limit is not None:
            order = order[:limit]
        x = decode_images([items[i] for i in order], tuple(self.in_shape[1:]))
        return x, torch.from_numpy(labels[order])

    def _folder_index(self, root: Path, split: str) -> tuple[list[Any], list[int]]:
        wnids = [w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()]
        if len(wnids) != self.num_classes:
            raise ValueError(f"{root / 'wnids.txt'} lists {len(wnids)} classes, expected {self.num_classes}")
        index = {w: i for i, w in enumerate(sorted(wnids))}
        items: list[Any] = []
        labels: list[int] = []
        if split == "train":
            for w in sorted(wnids):
                d = root / "train" / w / "images"
                files = sorted(d.glob("*.JPEG")) if d.is_dir() else []
                if not files:
                    raise self.not_found([root], FOLDER_FILES, [f"{FOLDER}/train/{w}/images/*.JPEG"], base=root.parent)
                items += files
                labels += [index[w]] * len(files)
        else:
            for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
                parts = line.split("\t") if "\t" in line else line.split()
                if len(parts) < 2:
                    continue
                fname, w = parts[0], parts[1]
                if w not in index:
                    raise ValueError(f"val_annotations.txt: unknown wnid {w!r} for {fname}")
                p = root / "val" / "images" / fname
                if not p.is_file():
                    raise self.not_found([root], FOLDER_FILES, [f"{FOLDER}/val/images/{fname}"], base=root.parent)
                items.append(p)
                labels.append(index[w])
        return items, labels

    def _hf_index(self, root: Path, split: str) -> tuple[list[Any], list[int]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        train, valid = self._hf_files(root)
        files = train if split == "train" else valid
        tables = [pq.read_table(f, columns=["image", "label"]) for f in files]
        table = pa.concat_tables(tables)
        images = table.column("image").to_pylist()
        items = [im["bytes"] if isinstance(im, dict) else im for im in images]
        labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
        names = self._hf_label_names(tables[0].schema)
        if names is not None and len(names) == self.num_classes and all(str(n).startswith("n") for n in names):
            remap = np.array([sorted(names).index(n) for n in names], dtype=np.int64)
            labels = remap[labels]
        return items, labels.tolist()

    @staticmethod
    def _hf_label_names(schema: Any) -> list[str] | None:
        meta = schema.metadata or {}
        raw = meta.get(b"huggingface")
        if not raw:
            return None
        try:
            feats = json.loads(raw)["info"]["features"]
            return list(feats["label"]["names"])
        except (KeyError, TypeError, ValueError):
            return None
