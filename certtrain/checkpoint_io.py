"""Checkpoint files: atomic writes, and clear errors for checkpoints that cannot be used.

* :class:`AtomicCheckpointIO` (a Lightning ``CheckpointIO``, ``Trainer(plugins=[AtomicCheckpointIO()])``)
  writes every checkpoint to a temporary file in the target directory, fsyncs it and renames it over
  the target with ``os.replace``: a run killed while saving leaves the previous checkpoint intact
  (plus at most a stray ``.<name>.tmp-*`` file), never a truncated one.
  It also stores ``checkpoint["state_dict_sha256"]``, a digest of the weights.
* :func:`read_checkpoint` loads a checkpoint file and turns a truncated / corrupted file (unreadable,
  or weights that no longer match their digest) into a :class:`CheckpointError` that says so.
* :func:`check_weights_fit` compares a checkpoint's ``state_dict`` with a module before any
  training or verification starts, and names both architectures when they differ.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "CheckpointError", "DIGEST_KEY", "atomic_torch_save", "check_weights_fit",
           "model_name", "quote_path_overrides", "read_checkpoint", "state_dict_digest"]

#: checkpoint key of the weights' digest written by AtomicCheckpointIO and checked by read_checkpoint
DIGEST_KEY = "state_dict_sha256"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, not written by certtrain, or another architecture."""


def state_dict_digest(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the tensors of a state dict."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        v = state_dict[key]
        h.update(key.encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(v.shape)}".encode())
            h.update(memoryview(t.view(torch.uint8).numpy()))
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same directory, fsync and ``os.replace``.

    If anything fails (pickling, a full disk, a signal) the temporary file is removed and ``path``
    keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    # os.open with 0o666 so that the umask applies, as for a file written in place
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic on local file systems (see :func:`atomic_torch_save`).

    Remote paths (``s3://`` ..., anything fsspec does not map to the local file system) fall back to
    Lightning's default writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by "
                            f"{type(self).__name__}")
        fs = get_filesystem(path)
        if "file" not in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if isinstance(checkpoint.get("state_dict"), Mapping):
            checkpoint = {**checkpoint, DIGEST_KEY: state_dict_digest(checkpoint["state_dict"])}
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", verify_digest: bool = True) -> dict[str, Any]:
    """Load a checkpoint file (``FileNotFoundError`` if absent, :class:`CheckpointError` if unreadable or
    if its weights do not match the digest :class:`AtomicCheckpointIO` stored with them)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist" if not p.exists()
                                else f"checkpoint {str(path)!r} is not a file")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, random bytes, pickle errors ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable PyTorch checkpoint "
                              f"(truncated or corrupted?): {type(e).__name__}: {msg}") from None
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no 'state_dict' (not a Lightning checkpoint)")
    if verify_digest and ckpt.get(DIGEST_KEY) and state_dict_digest(ckpt["state_dict"]) != ckpt[DIGEST_KEY]:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: its weights do not match the digest written "
                              "with them")
    ckpt = dict(ckpt)
    if isinstance(ckpt.get("certtrain_config"), Mapping):
        ckpt["certtrain_config"] = upgrade_config(ckpt["certtrain_config"])
    return ckpt


#: import names renamed since checkpoints were first written (old prefix -> new prefix)
_RENAMED_TARGETS = (("models.", "certtrain_models."), ("data.", "certtrain_data."))


def upgrade_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``certtrain_config`` in today's layout, so that old checkpoints keep loading:
    ``models.*`` / ``data.*`` targets (installed as ``certtrain_models`` / ``certtrain_data`` now),
    methods given by ``name`` (now classes with a ``_target_``), perturbations without a target."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()}
    for group in ("model", "dataset"):
        sec = out.get(group)
        if isinstance(sec, dict) and isinstance(sec.get("_target_"), str):
            for old, new in _RENAMED_TARGETS:
                if sec["_target_"].startswith(old):
                    sec["_target_"] = new + sec["_target_"][len(old):]
    m = out.get("method")
    if isinstance(m, dict) and "_target_" not in m and m.get("name"):
        # methods were a `name` key before they became classes (certtrain.methods)
        from .methods import METHODS

        cls = METHODS.get(str(m["name"]))
        if cls is not None:
            out["method"] = {"_target_": f"certtrain.methods.{cls.__qualname__}",
                             **{k: v for k, v in m.items() if k != "name"}}
    p = out.get("perturbation")
    if isinstance(p, dict) and "_target_" not in p:
        out["perturbation"] = {"_target_": "certtrain.threat.LpBall", **p}
    return out


def model_name(config: Mapping[str, Any] | None) -> str:
    """``model=<name>`` of a run config (``models.mlp`` → ``mlp``), with the options that differ from none."""
    if not config or not isinstance(config.get("model"), Mapping):
        return "an unknown model"
    m = config["model"]
    target = str(m.get("_target_", "?")).rsplit(".", 1)[-1]
    opts = ", ".join(f"{k}={v}" for k, v in m.items() if k != "_target_")
    return f"model={target} ({opts})" if opts else f"model={target}"


def check_weights_fit(state_dict: Mapping[str, Any], module: torch.nn.Module, ckpt_path: str | os.PathLike,
                      ckpt_config: Mapping[str, Any] | None = None,
                      run_config: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`CheckpointError` (naming both models) unless ``state_dict`` loads strictly into ``module``."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
              if k in state_dict and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        k, a, b = shapes[0]
        problems.append(f"{len(shapes)} of another shape (e.g. {k}: {a} in the checkpoint, {b} here)")
    raise CheckpointError(
        f"checkpoint {str(ckpt_path)!r} was trained with {model_name(ckpt_config)} but this run builds "
        f"{model_name(run_config)}: the weights do not fit ({'; '.join(problems)}). Use the checkpoint's "
        f"model settings, or start without it. Nothing was written.")


def quote_path_overrides(argv: list[str], keys: tuple[str, ...] = ("ckpt", "ckpt_path", "out")) -> list[str]:
    """Quote ``key=value`` command-line overrides whose path contains ``=`` (``best-epoch=059.ckpt``),
    which Hydra's override grammar would reject; other arguments are returned unchanged."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in keys and "=" in value and value[:1] not in "'\"" and "," not in value:
            if "'" not in value:
                arg = f"{key}='{value}'"
            elif '"' not in value:
                arg = f'{key}="{value}"'
        out.append(arg)
    return out
