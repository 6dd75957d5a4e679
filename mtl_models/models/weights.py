"""Reading a user's weights from local files, never from the network.

Formats (what libraries write when they save a model):
- a torch state dict (`.pt`, `.pth`, `.bin`, `.ckpt`), read with `torch.load(weights_only=True)`:
  pickled Python objects are refused in one line, not executed;
- `.safetensors`, one file or shards listed by a `*.safetensors.index.json`;
- a Hugging Face model folder: `config.json` beside `model.safetensors`, its sharded index,
  `pytorch_model.bin` or its index. The config comes back too (it builds an `hf:TYPE` trunk).

`read_weights` gives the flat name -> tensor dict and the files it read; `files_sha256` is the
digest a policy records, so `apply` refuses a file that changed since the search.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from spaces.errors import PrunefuseError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# What a Hugging Face folder holds, in the order `save_pretrained` prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
# Wrappers a training script puts around the state dict (Lightning, timm's train script, DDP).
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")


@dataclass(frozen=True)
class Weights:
    state: dict[str, torch.Tensor]   # flat name -> tensor, names as the library saved them
    config: dict | None              # a Hugging Face folder's config.json, else None
    files: tuple[Path, ...]          # every file read (the digest covers them all)


def read_weights(path, *, what: str) -> Weights:
    """The weights at `path` (a file or a Hugging Face folder). `what` names it in errors
    ("base checkpoint", "expert for task 'left'")."""
    p = Path(path)
    if not p.exists():
        raise PrunefuseError(f"{what} {str(path)!r} not found")
    if p.is_dir():
        return _read_folder(p, what)
    if p.name.endswith(".index.json"):
        state, files = _read_sharded(p, what)
        return Weights(state, None, files)
    return Weights(_read_file(p, what), None, (p,))


def files_sha256(files) -> str:
    """SHA-256 of one file's bytes; of several, over each one's name and bytes in name order."""
    files = sorted(Path(f) for f in files)
    h = hashlib.sha256()
    for f in files:
        if len(files) > 1:
            h.update(f.name.encode() + b"\0")
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def checkpoint_sha256(path, *, what: str) -> str:
    """The digest of everything `read_weights(path)` reads (without loading the tensors)."""
    p = Path(path)
    if not p.exists():
        raise PrunefuseError(f"{what} {str(path)!r} not found")
    if p.is_dir():
        weights = _folder_weights_file(p, what)
        files = [p / "config.json", *(_shards(weights, what) if weights.name.endswith(".index.json") else [weights])]
        return files_sha256(files)
    if p.name.endswith(".index.json"):
        return files_sha256(_shards(p, what))
    return files_sha256([p])


def _read_file(p: Path, what: str) -> dict:
    if p.suffix == ".safetensors":
        return _read_safetensors(p, what)
    if p.suffix in TORCH_SUFFIXES:
        return _read_torch(p, what)
    raise PrunefuseError(f"{what} {str(p)!r}: expected a .safetensors, {', '.join(TORCH_SUFFIXES)} file, a "
                         f"*.safetensors.index.json or a Hugging Face model folder")


def _read_safetensors(p: Path, what: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise PrunefuseError(f"{what} {str(p)!r} is not a readable .safetensors file ({_first_line(exc)})") from None


def load_weights(path, *, map_location="cpu"):
    """torch.load(path, weights_only=True) without torch's two-line pickle-protocol warning,
    which only ever precedes a refusal (a raw pickle, a poisoned cache entry: `torch.save` never
    writes such files) that the caller turns into one clear line; errors pass through."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=map_location, weights_only=True)


def _read_torch(p: Path, what: str) -> dict:
    try:
        state = load_weights(p)
    except Exception as exc:
        raise PrunefuseError(_unreadable_torch(p, what, exc)) from None
    return _unwrapped(state, p, what)


def _unwrapped(state, p: Path, what: str) -> dict:
    """The flat tensor dict inside a training script's checkpoint ({"state_dict": {...}, "epoch": 3})."""
    for _ in range(3):
        if isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
            inner = next((state[k] for k in NESTED_KEYS if isinstance(state.get(k), dict)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        kind = type(state).__name__ if not isinstance(state, dict) else "dict without tensors"
        raise PrunefuseError(f"{what} {str(p)!r} holds a {kind}, expected a state dict (name -> tensor)")
    # Non-tensor entries (a step counter saved beside the weights) are not weights.
    return {str(k): v for k, v in state.items() if torch.is_tensor(v)}


def _unreadable_torch(p: Path, what: str, exc: Exception) -> str:
    """One line for a file torch.load(weights_only=True) refuses: pickled objects, or not torch at all."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if pickled:
        return (f"{what} {str(p)!r} pickles Python objects ({pickled.group(1)}), not just weights; it is "
                f"refused unread. Save a state dict instead: torch.save(model.state_dict(), PATH)")
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    reason = detail.group(1).strip() if detail else _first_line(exc)
    return f"{what} {str(p)!r} is not a torch state dict file (torch.load(weights_only=True): {reason})"


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _shards(index: Path, what: str) -> list[Path]:
    """The index file and the shard files it lists, each inside the index's folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PrunefuseError(f"{what} {str(index)!r} is not a shard index with a 'weight_map' "
                             f"({_first_line(exc)})") from None
    folder = index.parent.resolve()
    shards = []
    for name in names:
        shard = (folder / str(name)).resolve()
        if shard.parent != folder:  # an index may not point outside its folder
            raise PrunefuseError(f"{what} {str(index)!r} lists shard {name!r} outside its folder")
        if not shard.is_file():
            raise PrunefuseError(f"{what} {str(index)!r} lists shard {name!r}, which is missing")
        shards.append(shard)
    return [index, *shards]


def _read_sharded(index: Path, what: str) -> tuple[dict, tuple[Path, ...]]:
    files = _shards(index, what)
    state = {}
    for shard in files[1:]:
        state.update(_read_file(shard, what))
    return state, tuple(files)


def _folder_weights_file(folder: Path, what: str) -> Path:
    if not (folder / "config.json").is_file():
        raise PrunefuseError(f"{what} {str(folder)!r} is a folder without config.json; expected a Hugging Face "
                             f"model folder (config.json + {HF_WEIGHT_FILES[0]}) or a weights file")
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise PrunefuseError(f"{what} {str(folder)!r} has config.json but no weights ({', '.join(HF_WEIGHT_FILES)})")


def _read_folder(folder: Path, what: str) -> Weights:
    weights = _folder_weights_file(folder, what)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise PrunefuseError(f"{what} {str(folder / 'config.json')!r} is not JSON ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise PrunefuseError(f"{what} {str(folder / 'config.json')!r} holds a {type(config).__name__}, not a mapping")
    if weights.name.endswith(".index.json"):
        state, files = _read_sharded(weights, what)
    else:
        state, files = _read_file(weights, what), (weights,)
    return Weights(state, config, (folder / "config.json", *files))
