"""Checkpoints: atomic save and safe load of plain state dicts, and the resume check on run folders.

A checkpoint is ``torch.save`` of a dict whose leaves are tensors, numbers, strings, lists and dicts
(model and EMA ``state_dict``s, the optimizer's ``state_dict``, the step, RNG states, the loss
history) — never pickled classes — and is read back with ``torch.load(weights_only=True)``, which
refuses anything else. Writes go to a temporary file in the same folder followed by ``os.replace``,
so a killed process leaves either the old checkpoint or the new one, never a truncated file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_NAME",
    "CONFIG_NAME",
    "SNAPSHOT_DIR",
    "save_snapshot",
    "ConfigMismatchError",
    "atomic_write_bytes",
    "atomic_write_text",
    "save_checkpoint",
    "load_checkpoint",
    "write_config",
    "read_config",
    "weights_sha256",
]

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
SNAPSHOT_DIR = "snapshots"


class ConfigMismatchError(ValueError):
    """A run folder holds a run of a different configuration than the one asked for."""


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    _atomic_write(Path(path), lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically ``torch.save`` a dict of state dicts / tensors / numbers / strings to ``path``."""
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict of state dicts and plain values; got {type(state).__name__}")
    _atomic_write(Path(path), lambda fh: torch.save(state, fh))


def save_snapshot(folder: str | os.PathLike, step: int, state: dict[str, Any], keep: int) -> Path:
    """Atomically write ``folder/step_<step>.pt`` and remove all but the ``keep`` newest snapshots."""
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    path = folder / f"step_{step:09d}.pt"
    save_checkpoint(path, state)
    for old in sorted(folder.glob("step_*.pt"))[:-keep] if keep > 0 else sorted(folder.glob("step_*.pt")):
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError for corrupt or unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {first} (not a checkpoint written by "
                         "fpe_lab, or one holding objects other than tensors and plain values)") from None


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """The sha256 (hex) of a state dict's tensors: each name, dtype, shape and raw bytes in sorted name order,
    so equal weights give equal checksums whatever device or file they came from."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_config(run_dir: str | os.PathLike, config: dict[str, Any]) -> None:
    """Write the resolved config as ``config.json`` (sorted keys, atomic)."""
    atomic_write_text(Path(run_dir) / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The dict stored in ``run_dir/config.json``."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {CONFIG_NAME}: not a run folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
