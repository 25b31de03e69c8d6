"""Checkpoints: plain data only (tensors, numbers, strings), written atomically, read with
``torch.load(weights_only=True)`` so loading a file can never run code.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from cnnvis.errors import CheckpointError, TrainingError
from cnnvis.io import temp_file_beside

FORMAT = "cnnvis-checkpoint/1"
_PREFIXES = ("module.", "_orig_mod.")


class _WriteErrors:
    """A file wrapper that remembers the ``OSError`` of a failed write: ``torch.save`` turns it
    into an opaque ``RuntimeError`` ("unexpected pos ..."), losing "No space left on device"."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write to a temp file in the same folder, fsync, then ``os.replace``: a kill at any moment
    leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        fd, tmp = temp_file_beside(path)
        with os.fdopen(fd, "wb") as handle:
            writer = _WriteErrors(handle)
            try:
                torch.save({"format": FORMAT, **payload}, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)  # the rename itself survives a power cut
    except OSError as exc:
        raise TrainingError(
            f"could not write checkpoint {path}: {exc.strerror or exc}",
            "Free disk space or choose a writable runs directory; the previous checkpoint is intact.",
        ) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform (Windows); the data itself is already synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back for the duration of the block, then deliver it.

    The trainer writes ``last.pt`` and ``best.pt`` of one epoch inside this, so an interrupt never
    leaves one updated and the other not; the write itself is atomic either way.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread, where SIGINT lands anyway
        return
    received: list[int] = []
    # A training process under torchrun treats SIGTERM (how torchrun stops it) as Ctrl-C: held back too.
    held = [signal.SIGINT] + [signal.SIGTERM] * (signal.getsignal(signal.SIGTERM) is signal.default_int_handler)
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)  # Python's default handler raises KeyboardInterrupt here
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), received[0])


def rng_state(device: torch.device, train_source: object) -> dict[str, torch.Tensor]:
    """This process's random state as a checkpoint stores it: torch's (CUDA's on a GPU) and the
    training batches' generators (shuffle order, and augmentation where it has its own)."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    if hasattr(train_source, "state_dict"):
        state = train_source.state_dict()
        rng["loader"] = state["generator"]
        if "augment_generator" in state:
            rng["augment"] = state["augment_generator"]
    elif getattr(train_source, "generator", None) is not None:
        rng["loader"] = train_source.generator.get_state()
    return rng


def restore_rng(rng: dict[str, torch.Tensor], device: torch.device, train_source: object) -> None:
    """Undo :func:`rng_state`: the resumed run draws what the uninterrupted one would have."""
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    if "loader" in rng:
        if hasattr(train_source, "load_state_dict"):
            extra = {"augment_generator": rng["augment"]} if "augment" in rng else {}
            train_source.load_state_dict({"generator": rng["loader"], **extra})
        elif getattr(train_source, "generator", None) is not None:
            train_source.generator.set_state(rng["loader"])


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a cnnvis checkpoint onto ``map_location`` (a CUDA checkpoint loads on a CPU machine)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    payload = _safe_load(path, map_location, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "model" not in payload:
        raise CheckpointError(f"{path}: not a cnnvis checkpoint (no model state or format marker)")
    payload["model"] = strip_prefixes(payload["model"])
    return payload


def _safe_load(path: Path, map_location: str | torch.device, what: str) -> Any:
    """``torch.load(weights_only=True)``, every failure turned into one sentence about the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler names the global it would have had to import.
        needs = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if needs:
            raise CheckpointError(
                f"{path}: refused to load: it needs {needs.group(1)}, and unpickling that could run code.",
                f"cnnvis loads only plain tensors and numbers (torch.load with weights_only=True); re-save the {what} as a state dict.",
            ) from None
        raise CheckpointError(f"{path}: not a readable {what} (the file is damaged or not a PyTorch file)") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - torch reports a damaged file as any of a dozen types
        # (RuntimeError from the zip reader, EOFError, KeyError/IndexError from a stray pickle stream ...)
        empty = path.is_file() and path.stat().st_size == 0
        if empty:
            detail = "the file is empty"
        elif isinstance(exc, RuntimeError):
            detail = _first_line(exc).split(". ")[0]
        else:
            detail = "not a PyTorch file"
        raise CheckpointError(f"{path}: not a readable {what} (truncated, or another format: {detail})") from None


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) key prefixes."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def load_state_dict_file(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights for ``model`` from a cnnvis checkpoint or a bare state-dict file."""
    payload = _safe_load(path, "cpu", "weights file")
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds no state dict")
    return strip_prefixes(state)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with a message a user can act on when the shapes disagree."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{source} was saved from a different architecture "
            f"({len(missing)} weights missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        key, saved, wanted = wrong[0]
        raise CheckpointError(
            f"{source}: weight {key} has shape {saved} but the model needs {wanted}"
            " (was num_classes or the architecture changed?)"
        )
    model.load_state_dict(state)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
