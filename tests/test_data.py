"""Tests of ``data/`` (datamodules) and ``conf/dataset/*.yaml``.

Fast and offline: ``digits`` ships with scikit-learn, real MNIST is read from the shared dataset
folder (skipped if absent), every other loader is tested on tiny fake files written here in the
real on-disk format.  torchvision md5-checks CIFAR-10 and SVHN; fake files cannot match, so those
tests patch torchvision's ``check_integrity`` in the fixture only (and one test checks that the
unpatched loader rejects the fakes).
"""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib
import inspect
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import RandomSampler, SequentialSampler

from certtrain_data import DATAMODULES, IMAGE_DATAMODULES, TEXT_DATAMODULES, DatasetNotFoundError, get_datamodule
from certtrain_data.base import CertDataModule, interleave_by_class

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def _check_batch(dm: CertDataModule, x: torch.Tensor, y: torch.Tensor) -> None:
    assert x.dtype == torch.float32
    assert tuple(x.shape[1:]) == tuple(dm.in_shape)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.dtype == torch.long
    assert int(y.min()) >= 0 and int(y.max()) < dm.num_classes


# --------------------------------------------------------------------------- registry / configs
def test_registry_and_unknown_name() -> None:
    assert set(IMAGE_DATAMODULES) == {"digits", "mnist", "fashion_mnist", "svhn", "cifar10", "tinyimagenet", "imagenet64"}
    assert set(TEXT_DATAMODULES) == {"movie_reviews", "sst2"}  # tested in test_text_data.py
    assert DATAMODULES == {**IMAGE_DATAMODULES, **TEXT_DATAMODULES}
    for name, cls in DATAMODULES.items():
        assert cls.name == name
    for name, cls in IMAGE_DATAMODULES.items():
        assert len(cls.mean) == len(cls.std) == cls.in_shape[0]
        assert all(0 < s < 1 for s in cls.std) and all(0 < m < 1 for m in cls.mean)
    with pytest.raises(ValueError) as exc:
        get_datamodule("cifar100")
    msg = str(exc.value)
    assert "cifar100" in msg and all(name in msg for name in DATAMODULES)


@pytest.mark.parametrize("path", sorted((REPO / "conf" / "dataset").glob("*.yaml")), ids=lambda p: p.stem)
def test_dataset_configs(path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    module, _, clsname = cfg["_target_"].rpartition(".")
    cls = getattr(importlib.import_module(module), clsname)
    assert cls is DATAMODULES[path.stem]
    assert cfg["data_dir"] == "${paths.data_dir}"
    assert cfg["num_classes"] == cls.num_classes
    if getattr(cls, "is_text", False):  # text: vocab_size / max_len instead of in_shape
        assert "in_shape" not in cfg and cfg["vocab_size"] > 2 and cfg["max_len"] > 0
    else:
        assert tuple(cfg["in_shape"]) == cls.in_shape
    kwargs = {k: v for k, v in cfg.items() if k != "_target_"}
    kwargs["data_dir"] = "/nonexistent"
    inspect.signature(cls.__init__).bind(None, **kwargs)  # every key is a constructor argument
    dm = cls(**kwargs)  # constructing never touches the disk
    if not getattr(cls, "is_text", False):
        assert dm.in_shape == cls.in_shape


def test_all_configs_present() -> None:
    assert {p.stem for p in (REPO / "conf" / "dataset").glob("*.yaml")} == set(DATAMODULES)


def test_shape_and_class_checks() -> None:
    get_datamodule("mnist", in_shape=[1, 28, 28], num_classes=10)
    with pytest.raises(ValueError, match="in_shape"):
        get_datamodule("mnist", in_shape=[3, 32, 32])
    with pytest.raises(ValueError, match="num_classes|classes"):
        get_datamodule("cifar10", num_classes=100)
    with pytest.raises(ValueError):
        get_datamodule("digits", batch_size=0)


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CERTTRAIN_DATA_DIR", str(tmp_path / "d"))
    assert get_datamodule("mnist").data_dir == tmp_path / "d"
    monkeypatch.delenv("CERTTRAIN_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert get_datamodule("mnist").data_dir == tmp_path / "data_cache"
    assert get_datamodule("mnist", data_dir="rel").data_dir == tmp_path / "rel"


def test_interleave_by_class() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    order = interleave_by_class(labels)
    assert labels[order].tolist() == [0, 1, 2, 0, 1, 2, 0, 2]
    assert sorted(order.tolist()) == list(range(8))


# --------------------------------------------------------------------------- digits
def test_digits_splits_shapes_ranges() -> None:
    from sklearn.datasets import load_digits

    dm = get_datamodule("digits", batch_size=32)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1297, 200, 300)
    assert dm.in_shape == (1, 8, 8) and dm.num_classes == 10
    # the three splits partition the 1797 images (compare sorted rows, since digits has duplicates)
    xs = torch.cat([dm.train_set.tensors()[0], dm.val_set.tensors()[0], dm.test_set.tensors()[0]])
    ref = torch.from_numpy(load_digits().images / 16.0).float().unsqueeze(1)
    key = lambda t: sorted(map(tuple, t.flatten(1).tolist()))  # noqa: E731
    assert key(xs) == key(ref)
    assert float(xs.max()) == 1.0 and float(xs.min()) == 0.0
    assert set(dm.train_set.indices.tolist()).isdisjoint(dm.val_set.indices.tolist())

    tl = dm.train_dataloader()
    assert isinstance(tl.sampler, RandomSampler)
    assert isinstance(dm.val_dataloader().sampler, SequentialSampler)
    assert isinstance(dm.test_dataloader().sampler, SequentialSampler)
    x, y = next(iter(tl))
    assert x.shape == (32, 1, 8, 8)
    _check_batch(dm, x, y)
    assert sum(len(b[1]) for b in dm.test_dataloader()) == 300


def test_digits_deterministic() -> None:
    a, b, c = (get_datamodule("digits", seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    for split in ("train_set", "val_set", "test_set"):
        xa, ya = getattr(a, split).tensors()
        xb, yb = getattr(b, split).tensors()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.test_set.tensors()[0], c.test_set.tensors()[0])


def test_digits_subsets_and_sizes() -> None:
    dm = get_datamodule("digits", train_subset=100, val_size=50, test_subset=40, test_size=400)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (100, 50, 40)
    dm = get_datamodule("digits", val_size=0)
    dm.setup()
    assert len(dm.val_set) == 0 and len(dm.train_set) == 1497
    with pytest.raises(ValueError):
        get_datamodule("digits", train_subset=1490, val_size=200).setup()


def test_digits_lazy_setup_by_stage() -> None:
    dm = get_datamodule("digits")
    dm.setup("test")
    assert dm._train_set is None and len(dm.test_set) == 300
    assert len(dm.train_dataloader().dataset) == 1297  # set up on demand


# --------------------------------------------------------------------------- real MNIST
@pytest.fixture(scope="module")
def shared_mnist() -> Path:
    raw = SHARED_DATASETS / "MNIST" / "raw"
    if not (raw / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found in {raw} (expected the torchvision raw layout)")
    return SHARED_DATASETS


def test_mnist_real(shared_mnist: Path) -> None:
    dm = get_datamodule("mnist", data_dir=shared_mnist, train_subset=1000, val_size=200, test_subset=500,
                        batch_size=100, in_shape=[1, 28, 28], num_classes=10)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1000, 200, 500)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 28, 28)
    _check_batch(dm, x, y)
    assert float(x.max()) == 1.0  # ToTensor scaling, no normalization
    assert len(torch.unique(dm.train_set.targets)) == 10
    # the first test images of the official set, in order (label of MNIST test #0 is 7)
    assert dm.test_set.targets[:3].tolist() == [7, 2, 1]
    dm2 = get_datamodule("mnist", data_dir=shared_mnist, train_subset=1000, val_size=200, test_subset=500)
    dm2.setup("fit")
    assert torch.equal(dm.val_set.indices, dm2.val_set.indices)


def test_mnist_real_full_split(shared_mnist: Path) -> None:
    dm = get_datamodule("mnist", data_dir=shared_mnist)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    assert set(dm.train_set.indices.tolist()).isdisjoint(dm.val_set.indices.tolist())
    x, _ = dm.test_set.tensors()
    assert abs(float(x.mean()) - dm.mean[0]) < 0.01 and abs(float(x.std()) - dm.std[0]) < 0.01


# --------------------------------------------------------------------------- missing data
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "svhn", "cifar10", "tinyimagenet", "imagenet64"])
def test_missing_data_error(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = DATAMODULES[name]
    monkeypatch.setattr(cls, "load_split", lambda *a, **k: pytest.fail("loading started before the check"))
    dm = get_datamodule(name, data_dir=tmp_path)
    with pytest.raises(DatasetNotFoundError) as exc:
        dm.prepare_data()
    with pytest.raises(FileNotFoundError):  # it is a FileNotFoundError
        dm.setup()
    err = exc.value
    msg = str(err)
    assert name in msg and str(tmp_path) in msg and "download" in msg
    assert err.expected and err.missing and err.dataset == name
    expected_name = {
        "mnist": "train-images-idx3-ubyte", "fashion_mnist": "FashionMNIST/raw/t10k-labels-idx1-ubyte",
        "svhn": "train_32x32.mat", "cifar10": "cifar-10-batches-py/data_batch_1",
        "tinyimagenet": "tiny-imagenet-200/wnids.txt", "imagenet64": "train_data_batch_10.npz",
    }[name]
    assert expected_name in msg
    assert not any(tmp_path.iterdir())  # nothing created


# --------------------------------------------------------------------------- fake files
def _write_idx(raw: Path, prefix: str, n: int, rng: np.random.Generator) -> np.ndarray:
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
        np.array([2051, n, 28, 28], dtype=">i4").tobytes() + imgs.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([2049, n], dtype=">i4").tobytes() + labels.tobytes())
    return imgs


def write_fake_fashion_mnist(root: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    return _write_idx(raw, "train", 60, rng), _write_idx(raw, "t10k", 20, rng)


def test_fashion_mnist_fake(tmp_path: Path) -> None:
    train_imgs, test_imgs = write_fake_fashion_mnist(tmp_path)
    dm = get_datamodule("fashion_mnist", data_dir=tmp_path, val_size=10, batch_size=8)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50, 10, 20)
    x, y = dm.test_set[3]
    assert torch.allclose(x[0], torch.from_numpy(test_imgs[3]).float() / 255) and y == 3
    assert dm.train_set.transform is None  # no augmentation for MNIST-like data
    _check_batch(dm, *next(iter(dm.train_dataloader())))
    dm = get_datamodule("fashion_mnist", data_dir=tmp_path, val_size=10, train_subset=20, test_subset=5)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (20, 10, 5)
    assert sorted(dm.train_set.indices.tolist() + dm.val_set.indices.tolist()) == list(range(30))


def test_download_flag_uses_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    calls = []

    def fake_download(self: tvd.FashionMNIST) -> None:  # stands in for the network
        calls.append(self.raw_folder)
        if not (Path(self.raw_folder) / "train-images-idx3-ubyte").exists():
            write_fake_fashion_mnist(Path(self.root))

    monkeypatch.setattr(tvd.FashionMNIST, "download", fake_download)
    dm = get_datamodule("fashion_mnist", data_dir=tmp_path / "dl", val_size=10, download=True)
    dm.prepare_data()
    assert calls and calls[0] == str(tmp_path / "dl" / "FashionMNIST" / "raw")
    dm.setup()
    assert len(dm.train_set) == 50
    n = len(calls)
    get_datamodule("fashion_mnist", data_dir=tmp_path / "dl", download=True).prepare_data()
    assert len(calls) == n  # already present: no download


def write_fake_cifar10(root: Path, n_per_batch: int = 6, n_test: int = 8) -> dict[str, np.ndarray]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(d / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": [f"{i}.png" for i in range(n)]}, f)
        out[name] = data
        out[name + "_labels"] = np.array(labels)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": n_per_batch}, f)
    return out


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake files cannot match torchvision's md5 sums: check existence only (tests only)."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.svhn as tv_svhn

    def exists_only(fpath: str, md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    monkeypatch.setattr(tv_cifar, "check_integrity", exists_only)
    monkeypatch.setattr(tv_svhn, "check_integrity", exists_only)


def test_cifar10_fake(tmp_path: Path, no_md5: None) -> None:
    ref = write_fake_cifar10(tmp_path)
    dm = get_datamodule("cifar10", data_dir=tmp_path, val_size=5, batch_size=4, in_shape=(3, 32, 32))
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (25, 5, 8)
    x, y = dm.test_set[2]
    expect = torch.from_numpy(ref["test_batch"][2].reshape(3, 32, 32)).float() / 255  # CHW-flattened rows
    assert torch.allclose(x, expect) and y == int(ref["test_batch_labels"][2])
    # full training set in file order: batch 2, image 0 is overall image 6
    xs, _ = dm.train_set.tensors()
    all_train = np.concatenate([ref[f"data_batch_{i}"] for i in range(1, 6)])
    idx = dm.train_set.indices.numpy()
    assert torch.allclose(xs, torch.from_numpy(all_train[idx].reshape(-1, 3, 32, 32)).float() / 255)
    # augmentation on train only (crop + flip), same shape, still in [0, 1]
    assert dm.train_set.transform is not None and dm.test_set.transform is None
    _check_batch(dm, *next(iter(dm.train_dataloader())))
    _check_batch(dm, *next(iter(dm.test_dataloader())))
    dm = get_datamodule("cifar10", data_dir=tmp_path, val_size=5, augment=False)
    assert dm.train_set.transform is None
    assert torch.allclose(dm.train_set[0][0], xs[0])


def test_cifar10_fake_rejected_by_md5(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="integrity"):
        get_datamodule("cifar10", data_dir=tmp_path, val_size=5).setup()


def write_fake_svhn(root: Path, n_train: int = 30, n_test: int = 12) -> dict[str, np.ndarray]:
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, 10 = digit 0
        savemat(root / f"{split}_32x32.mat", {"X": X, "y": y})
        out[split] = X
        out[split + "_y"] = y[:, 0]
    return out


@pytest.mark.parametrize("sub", ["SVHN", ""])
def test_svhn_fake(tmp_path: Path, no_md5: None, sub: str) -> None:
    ref = write_fake_svhn(tmp_path / sub if sub else tmp_path)
    dm = get_datamodule("svhn", data_dir=tmp_path, val_size=6, batch_size=5)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 6, 12)
    x, y = dm.test_set[9]
    expect = torch.from_numpy(ref["test"][..., 9]).permute(2, 0, 1).float() / 255  # HWC -> CHW
    assert torch.allclose(x, expect)
    assert y == 0  # label 10 in the file = digit 0
    assert dm.test_set.targets.tolist() == [int(v) % 10 for v in ref["test_y"]]
    tf = dm.train_set.transform
    assert tf is not None and not any(type(t).__name__ == "RandomHorizontalFlip" for t in tf.transforms)
    _check_batch(dm, *next(iter(dm.train_dataloader())))


def test_svhn_fake_rejected_by_md5(tmp_path: Path) -> None:
    write_fake_svhn(tmp_path / "SVHN")
    with pytest.raises(DatasetNotFoundError, match="integrity"):
        get_datamodule("svhn", data_dir=tmp_path).setup()


def _jpeg(arr: np.ndarray, mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode=None if mode == "RGB" else mode).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _flat_image(value: int, gray: bool = False) -> np.ndarray:
    shape = (64, 64) if gray else (64, 64, 3)
    return np.full(shape, value, dtype=np.uint8)


WNIDS = [f"n{10000000 + 37 * i:08d}" for i in range(200)]


def write_fake_tinyimagenet(root: Path, per_class: int = 2, n_val: int = 10) -> list[str]:
    base = root / "tiny-imagenet-200"
    wnids = list(reversed(WNIDS))  # wnids.txt is not sorted in the real file either
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        for k in range(per_class):
            # pixel value encodes the class (sorted index) so labels can be checked after JPEG
            (d / f"{w}_{k}.JPEG").write_bytes(_jpeg(_flat_image(WNIDS.index(w)), ))
    lines = []
    for i in range(n_val):
        w = WNIDS[(7 * i) % 200]
        (base / "val" / "images" / f"val_{i}.JPEG").write_bytes(_jpeg(_flat_image(i * 20, gray=i == 0), "L" if i == 0 else "RGB"))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return wnids


def test_tinyimagenet_folder_fake(tmp_path: Path) -> None:
    write_fake_tinyimagenet(tmp_path)
    dm = get_datamodule("tinyimagenet", data_dir=tmp_path, train_subset=250, val_size=50, batch_size=16)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (250, 50, 10)
    # the first 300 training images are round-robin over classes: 200 classes + 100 more
    labels = torch.cat([dm.train_set.targets, dm.val_set.targets])
    assert torch.bincount(labels, minlength=200).tolist() == [2] * 100 + [1] * 100
    # label = index of the wnid in sorted order (pixel value written = that index)
    xs, ys = dm.train_set.tensors()
    assert torch.allclose(xs.mean(dim=(1, 2, 3)) * 255, ys.float(), atol=2.0)
    assert dm.test_set.targets.tolist() == [(7 * i) % 200 for i in range(10)]
    x0, _ = dm.test_set[0]  # grayscale JPEG -> 3 channels
    assert x0.shape == (3, 64, 64)
    x5, _ = dm.test_set[5]
    assert abs(float(x5.mean()) * 255 - 100) < 2
    _check_batch(dm, *next(iter(dm.train_dataloader())))


def test_tinyimagenet_folder_missing_class_dir(tmp_path: Path) -> None:
    write_fake_tinyimagenet(tmp_path)
    w = WNIDS[5]
    for p in (tmp_path / "tiny-imagenet-200" / "train" / w / "images").iterdir():
        p.unlink()
    with pytest.raises(DatasetNotFoundError, match=w):
        get_datamodule("tinyimagenet", data_dir=tmp_path, val_size=10).setup("fit")


def write_fake_tinyimagenet_hf(root: Path, per_class: int = 2, n_val: int = 6) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(reversed(WNIDS))  # HF label index i means wnid names[i]
    d = root / "tiny-imagenet" / "data"
    d.mkdir(parents=True)
    meta = {b"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}}}).encode()}

    def write(path: Path, labels: list[int], values: list[int]) -> None:
        images = [{"bytes": _jpeg(_flat_image(v)), "path": None} for v in values]
        table = pa.table({"image": images, "label": pa.array(labels, pa.int64())})
        pq.write_table(table.replace_schema_metadata(meta), path)

    train_labels = [c for c in range(200) for _ in range(per_class)]  # stored class by class
    write(d / "train-00000-of-00001-abc.parquet", train_labels, [WNIDS.index(names[c]) for c in train_labels])
    val_labels = [(3 * i) % 200 for i in range(n_val)]
    write(d / "valid-00000-of-00001-def.parquet", val_labels, [10 * i for i in range(n_val)])
    return names


def test_tinyimagenet_hf_fake(tmp_path: Path) -> None:
    names = write_fake_tinyimagenet_hf(tmp_path)
    with pytest.raises(DatasetNotFoundError):
        get_datamodule("tinyimagenet", data_dir=tmp_path, source="folder").prepare_data()
    dm = get_datamodule("tinyimagenet", data_dir=tmp_path, train_subset=300, val_size=20, test_subset=4)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (300, 20, 4)
    xs, ys = dm.train_set.tensors()
    assert torch.allclose(xs.mean(dim=(1, 2, 3)) * 255, ys.float(), atol=2.0)  # remapped to sorted wnids
    assert dm.test_set.targets.tolist() == [WNIDS.index(names[(3 * i) % 200]) for i in range(4)]
    with pytest.raises(ValueError, match="source"):
        get_datamodule("tinyimagenet", source="web")


def write_fake_imagenet64(root: Path, per_batch: int = 4, n_val: int = 7) -> dict[str, np.ndarray]:
    base = root / "imagenet64"
    rng = np.random.default_rng(3)
    out = {}
    for i in range(1, 11):
        d = base / ("Imagenet64_train_part1_npz" if i <= 5 else "Imagenet64_train_part2_npz")
        d.mkdir(parents=True, exist_ok=True)
        data = rng.integers(0, 256, size=(per_batch, 12288), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(1, 1001, size=per_batch)]
        np.savez(d / f"train_data_batch_{i}.npz", data=data, labels=labels, mean=data.mean(0))
        out[f"train_{i}"] = data
        out[f"train_{i}_labels"] = np.array(labels)
    d = base / "Imagenet64_val_npz"
    d.mkdir()
    data = rng.integers(0, 256, size=(n_val, 12288), dtype=np.uint8)
    labels = [1000, 1] + [int(v) for v in rng.integers(1, 1001, size=n_val - 2)]
    np.savez(d / "val_data.npz", data=data, labels=labels)
    out["val"] = data
    out["val_labels"] = np.array(labels)
    return out


def test_imagenet64_fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import certtrain_data.imagenet64 as inet

    ref = write_fake_imagenet64(tmp_path)
    dm = get_datamodule("imagenet64", data_dir=tmp_path, val_size=5, batch_size=4)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (35, 5, 7)
    assert dm.test_set.targets[:2].tolist() == [999, 0]  # 1-based -> 0-based
    x, _ = dm.test_set[3]
    row = ref["val"][3]
    # CHW-flattened rows: channel c, pixel (i, j) is row[c * 4096 + i * 64 + j]
    assert float(x[1, 2, 5]) * 255 == pytest.approx(float(row[4096 + 2 * 64 + 5]))
    assert torch.allclose(x, torch.from_numpy(row.reshape(3, 64, 64)).float() / 255)
    all_labels = np.concatenate([ref[f"train_{i}_labels"] for i in range(1, 11)]) - 1
    idx = torch.cat([dm.train_set.indices, dm.val_set.indices])
    assert sorted(all_labels[idx.numpy()].tolist()) == sorted(all_labels.tolist())
    _check_batch(dm, *next(iter(dm.train_dataloader())))

    # train_subset: only the leading batches are read
    read = []
    orig = inet.load_npz_batch
    monkeypatch.setattr(inet, "load_npz_batch", lambda p: read.append(Path(p).name) or orig(p))
    dm = get_datamodule("imagenet64", data_dir=tmp_path, train_subset=6, val_size=3)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (6, 3)
    assert read == ["train_data_batch_1.npz", "train_data_batch_2.npz", "train_data_batch_3.npz"]


def test_imagenet64_partial_and_no_download(tmp_path: Path) -> None:
    write_fake_imagenet64(tmp_path)
    (tmp_path / "imagenet64" / "Imagenet64_train_part2_npz" / "train_data_batch_7.npz").unlink()
    with pytest.raises(DatasetNotFoundError) as exc:
        get_datamodule("imagenet64", data_dir=tmp_path).setup()
    assert [Path(m).name for m in exc.value.missing] == ["train_data_batch_7.npz"]
    with pytest.raises(DatasetNotFoundError, match="login"):
        get_datamodule("imagenet64", data_dir=tmp_path, download=True).prepare_data()
