"""Saving and loading a compressed model without pickle.

A structurally pruned model no longer fits a fresh model's shapes, and torch-pruning's own
loader needs pickle. Instead the folder holds a plain state dict (`model.pt`, loadable with
`torch.load(..., weights_only=True)`) and the policy: `load` rebuilds the fresh model from the
policy, resizes each module to the saved shapes (`mtl_models.models.resize`: one resizer per module
type, in `RESIZERS`), and loads the weights strictly.
"""
from __future__ import annotations

import glob
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from spaces.errors import PrunefuseError
from spaces.policy import Policy

from mtl_models.models.versions import with_versions
from mtl_models.models.weights import load_weights
from mtl_models.models.resize import RESIZERS, resize_to  # noqa: F401  (how each module type takes saved shapes)


SAVED_FILES = {"model.pt", "policy.yaml", "metrics.json", "model.onnx"}  # what `save` writes


def save(model, policy: Policy, metrics: dict, out_dir, *, files: dict | None = None) -> Path:
    """Write model.pt + policy.yaml + metrics.json into `out_dir`, replacing it only when complete.

    An existing model folder is swapped for the new one in one atomic exchange of names
    (renameat2 RENAME_EXCHANGE), so a kill at any moment leaves the old or the new model at
    `out_dir`; where the filesystem cannot exchange, two renames, and the next `save` (or
    `check_target`) puts a model left aside by a kill between them back first.
    """
    out = check_target(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        buffer = io.BytesIO()  # serialised here, written by Python: a full disk is a plain OSError
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
        _write_synced(staging / "model.pt", buffer.getvalue())
        _write_synced(staging / "policy.yaml", policy.to_yaml().encode())
        _write_synced(staging / "metrics.json", json.dumps(metrics, indent=1, default=str).encode())
        for name, data in (files or {}).items():  # model.onnx: SAVED_FILES names what may be here
            _write_synced(staging / name, data)
        if out.exists():
            if _exchange(staging, out):
                shutil.rmtree(staging, ignore_errors=True)   # now the old model
            else:
                old = _aside(out)
                shutil.rmtree(old, ignore_errors=True)
                out.rename(old)
                staging.rename(out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def check_target(out_dir) -> Path:
    """`out_dir` may receive a model: new, empty, or an earlier `save`, in a writable folder.
    Called before any training; first tidies what a killed `save` left beside it."""
    from spaces.files import check_writable_folder

    out = Path(out_dir).resolve()
    _recover(out)
    if out.exists() and (not out.is_dir() or not _replaceable(out)):
        raise PrunefuseError(f"{str(out_dir)!r} exists and is not a saved prunefuse model; "
                             f"choose a new or empty folder for -o")
    check_writable_folder(out.parent, "-o", shown=out_dir)
    return out


def _aside(out: Path) -> Path:
    return out.with_name(f".{out.name}.old")


def _recover(out: Path) -> None:
    """A model a killed `save` left aside goes back to `out`; its other leftovers (staging
    folders holding only model files) are removed."""
    if not out.parent.is_dir():
        return
    old = _aside(out)
    if not out.exists() and old.is_dir() and (old / "model.pt").is_file() and _replaceable(old):
        old.rename(out)
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.*"):
        if leftover.is_dir() and _replaceable(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names `a` and `b` (Linux renameat2); False where that is not supported."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replaceable(folder: Path) -> bool:
    """Only an empty folder or an earlier `save` may be replaced: never a user's other files."""
    names = {p.name for p in folder.iterdir()}
    return not names or names <= SAVED_FILES and "model.pt" in names


def load(out_dir, *, suite=None):
    """(model, policy) from a folder written by `save` / `prunefuse apply`. `suite`: the
    policy's suite, where the caller has it built already (it is not built again)."""
    from mtl_models import suites

    folder = Path(out_dir)
    if not (folder / "model.pt").is_file() or not (folder / "policy.yaml").is_file():
        raise PrunefuseError(f"{str(folder)!r} is not a saved prunefuse model (needs model.pt and policy.yaml)")
    policy = Policy.from_yaml(folder / "policy.yaml")
    if suite is None:
        suite = suites.from_spec(policy.suite)
    model = suite.build_model(**policy.model)
    state = load_weights(folder / "model.pt")
    resize_to(model, state)
    try:
        model.load_state_dict(with_versions(model, state), strict=True)  # a user's model class too
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        raise PrunefuseError(f"{str(folder / 'model.pt')!r} does not fit the model its policy builds: {reason}") from None
    return model.eval(), policy
