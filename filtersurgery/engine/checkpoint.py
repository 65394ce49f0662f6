"""Crash-safe checkpoint and metrics I/O.

Every writer goes through :func:`atomic_path`: the content is written to a temporary file
in the destination's own folder, flushed and ``fsync``-ed, then ``os.replace``-d onto the
destination (atomic on POSIX and Windows within one file system) and the folder entry is
synced. A reader therefore sees either the old file or the complete new one, never a
partial file; a failed write leaves the destination untouched and removes its temp file.

Formats (docs/data.md):
- weights: ``safetensors`` (:func:`save_state_dict`), a plain ``state_dict`` that loads
  with ``strict=True``. Shared or non-contiguous tensors (tied weights, views) are
  written as independent contiguous copies, so each key holds its own data.
- resume state: one ``torch.save`` file (:func:`save_training_state`) holding model and
  optimizer state dicts and an ``extra`` dict restricted to what
  ``torch.load(weights_only=True)`` accepts (tensors, numbers, strings, bools, None,
  lists/tuples/dicts of those); :func:`rng_state` packs the RNG states that way.
- metrics: JSON (:func:`atomic_write_json`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import secrets
import shutil
import zipfile
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional

import numpy as np
import torch

TRAINING_STATE_FORMAT = "filtersurgery-training-state"
STATE_FILE = "state.pt"  # a run folder's resumable state: OUT/seedS/.work/state.pt
TRAINING_STATE_VERSION = 1
_TEMP_NAME = re.compile(r"^\..*\.tmp-[0-9a-f]{8}(\.[^.]*)?$")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _os_error(e: OSError, what: str) -> OSError:
    """One-line error for a failed write: PermissionError for denied / read-only, else ValueError."""
    why = (e.strerror or type(e).__name__).lower()
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        why = "a file is in the way (not a directory)"
    if isinstance(e, PermissionError) or e.errno in _DENIED:
        return PermissionError(f"{what}: {'permission denied' if e.errno in (errno.EACCES, None) else why}")
    return ValueError(f"{what}: {why}")


def make_dir(directory, arg: Optional[str] = "out") -> None:
    """``mkdir -p directory``; a failure (denied, read-only, a file in the way) is one line:
    ``ARG: cannot create directory D: why``, or ``cannot create output directory D: why``
    when ``arg`` is None."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:  # denied, read-only file system, a file in the way (ENOTDIR/EEXIST)
        what = f"{arg}: cannot create directory" if arg else "cannot create output directory"
        raise _os_error(e, f"{what} {directory}") from None


def _prepare_dir(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    make_dir(directory, None)
    if os.path.isdir(path):
        raise ValueError(f"cannot write {path}: it is a directory")
    return directory


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    The temp name keeps ``path``'s suffix (``savefig`` infers the format from it). On any
    exception the temp file is removed, ``path`` is left as it was, and the exception
    propagates. A folder that cannot be written raises a one-line ``PermissionError``.
    """
    path = os.fspath(path)
    directory = _prepare_dir(path)
    base = os.path.basename(path)
    stem, suffix = os.path.splitext(base)
    tmp = os.path.join(directory, f".{stem}.tmp-{secrets.token_hex(4)}{suffix}")
    try:
        open(tmp, "xb").close()
    except OSError as e:  # denied, read-only file system, no space left
        raise _disk_full(e, directory, path) or _os_error(e, f"cannot write to directory {directory}") from None
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        full = _disk_full(e, directory, path)
        if full is not None:
            raise full from None
        raise
    _fsync_dir(directory)


# free bytes below which a failed write is taken for a full disk (writers that do not pass errno on, such
# as torch.save's "[enforce fail at inline_container.cc] unexpected pos", say nothing clearer)
_NEARLY_FULL = 16 * 2**20


@contextlib.contextmanager
def reporting_full_disk(path) -> Iterator[None]:
    """Turn a full disk met while writing ``path`` in place (an append, e.g. ``epochs.csv``) into a :class:`DiskFullError`."""
    try:
        yield
    except OSError as e:
        path = os.fspath(path)
        full = _disk_full(e, os.path.dirname(os.path.abspath(path)), path)
        if full is not None:
            raise full from None
        raise


class DiskFullError(OSError):
    """A write failed because the file system holding it is full (``errno`` ENOSPC); one line, naming the path."""


def _disk_full(e: BaseException, directory: str, path: str) -> Optional[DiskFullError]:
    """A :class:`DiskFullError` when the failed write ``e`` of ``path`` ran out of space in ``directory``, else None."""
    if not isinstance(e, (OSError, RuntimeError)) or isinstance(e, DiskFullError):
        return None
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    enospc = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if not enospc and (free is None or free >= _NEARLY_FULL):
        return None
    left = f"{free} bytes free" if free is not None else "no space left"
    err = DiskFullError(f"writing {path} failed: the disk is full ({left} in {directory}); the files written "
                        f"before are intact: free some space and run the same command again to resume")
    err.errno = errno.ENOSPC
    return err


def clean_temp_files(directory: str) -> List[str]:
    """Remove temp files that a killed writer left in ``directory`` (``.NAME.tmp-XXXXXXXX.SUFFIX``).

    Call it at start-up of a resumed run (rank 0 only, before writing). Returns the removed paths.
    """
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        if _TEMP_NAME.match(name):
            p = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
                removed.append(p)
    return removed


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(text: str, path: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (e.g. a CSV rewritten each epoch)."""
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: str, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically. Unserializable ``obj`` -> ValueError, nothing written."""
    try:
        text = json.dumps(obj, indent=indent, sort_keys=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot write {path} as JSON: {e}") from None
    atomic_write_text(text, path)


def read_json(path: str) -> Any:
    """Read a JSON file. Missing -> FileNotFoundError, invalid -> ValueError (one line, naming the path)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt JSON file {path}: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------- run folder lock

LOCK_FILE = ".lock"
_HELD: Dict[str, List[int]] = {}  # real path of a locked folder -> [fd, depth] (this process)


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock (one line: the folder and the holder's process id)."""


@contextlib.contextmanager
def run_lock(folder) -> Iterator[None]:
    """Hold an exclusive OS lock on run folder ``folder`` (``fcntl.flock`` on ``folder/.lock``, which
    records the holder's process id) for the ``with`` block; re-entrant within one process.

    A second process that asks for the same folder gets :class:`RunFolderBusy` at once, naming the
    folder and the holder. The operating system releases the lock when the holder exits, however
    it ends (a SIGKILLed run leaves no stale lock). Where ``fcntl`` is missing the folder is not locked.
    """
    make_dir(folder)
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = os.path.join(folder, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderBusy(f"out: {folder} is in use by another run (process {holder}); wait for it to end, "
                            f"or use another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# --------------------------------------------------------------------------- weights


def refuse_other_settings(where: Any, old: Mapping[str, Any], new: Mapping[str, Any],
                          keys: Optional[List[str]] = None, what: str = "") -> None:
    """One-line ValueError when a run folder holds a run with other settings.

    Compares ``old`` (read from the folder) with ``new`` on ``keys`` (default: every key of
    either); the message names the first differing key, so nothing is resumed into, or
    overwritten in, a folder that belongs to another run.
    """
    names = keys if keys is not None else sorted(set(old) | set(new))
    diff = [k for k in names if old.get(k) != new.get(k)]
    if diff:
        k = diff[0]
        raise ValueError(f"out: {where} holds a run with {what}{k}={old.get(k)!r} (now {new.get(k)!r}); "
                         f"use another --out to keep both")


def _independent_tensors(state_dict: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous tensors, each owning its storage (what safetensors requires)."""
    out: Dict[str, torch.Tensor] = {}
    seen = set()
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise ValueError(f"state_dict keys must be strings, got {k!r}")
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"state_dict[{k!r}] is a {type(v).__name__}, not a tensor: safetensors stores tensors only")
        t = v.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device.type)
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.numel() * t.element_size() == storage.nbytes()
        if key in seen or not whole:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add((t.untyped_storage().data_ptr(), "cpu"))
        out[k] = t
    return out


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str,
                    metadata: Optional[Dict[str, str]] = None) -> None:
    """Save a ``state_dict`` as safetensors, atomically.

    Tensors are moved to CPU; tied (shared-storage) and non-contiguous tensors are
    cloned so that every key is stored with its own data and the file loads back with
    ``model.load_state_dict(load_state_dict(path), strict=True)``. ``metadata`` is an
    optional ``str -> str`` dict kept in the file header.
    """
    from safetensors.torch import save_file

    tensors = _independent_tensors(state_dict)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map str to str")
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_state_dict(path: str, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """Load a safetensors ``state_dict``. Missing -> FileNotFoundError, corrupt -> ValueError (one line)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"corrupt or unreadable checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def read_metadata(path: str) -> Dict[str, str]:
    """The ``str -> str`` metadata stored in a safetensors header ({} if none)."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"corrupt or unreadable checkpoint {path}: {e}") from None


# --------------------------------------------------------------------------- resume state

_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size)


def _check_weights_only(obj: Any, where: str) -> None:
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise ValueError(f"{where} has a key of type {type(k).__name__}; use str/int keys")
            _check_weights_only(v, f"{where}[{k!r}]")
        return
    raise ValueError(f"{where} is a {type(obj).__name__}: training state may only hold tensors, numbers, "
                     f"strings, bools, None and lists/tuples/dicts of those (torch.load weights_only)")


def save_training_state(path: str, model_sd: Mapping[str, Any], optimizer_sd: Optional[Mapping[str, Any]],
                        extra: Optional[Dict[str, Any]] = None) -> None:
    """Save everything needed to resume training, atomically, in one ``torch.save`` file.

    ``model_sd`` and ``optimizer_sd`` are state dicts (the optimizer's may be None);
    ``extra`` holds the rest (epoch, step, scheduler / GradScaler state dicts,
    :func:`rng_state`, ...). Everything must be loadable with
    ``torch.load(weights_only=True)``; anything else raises a ValueError naming it,
    before anything is written. Tensors are stored on CPU.
    """
    state = {"format": TRAINING_STATE_FORMAT, "version": TRAINING_STATE_VERSION,
             "model": dict(model_sd), "optimizer": None if optimizer_sd is None else dict(optimizer_sd),
             "extra": dict(extra or {})}
    _check_weights_only(state, "training state")
    state = _to_cpu(state)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def load_training_state(path: str, device: str = "cpu") -> Dict[str, Any]:
    """Load a :func:`save_training_state` file with ``weights_only=True``.

    Returns ``{"model": ..., "optimizer": ..., "extra": ...}`` (plus format/version).
    Missing -> FileNotFoundError, corrupt or foreign -> ValueError, one line naming the path.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training state not found: {path}")
    from safetensors import SafetensorError  # torch.load reads safetensors files too (and raises this)

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            AttributeError, KeyError, IndexError, SafetensorError) as e:
        msg = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"corrupt or unreadable training state {path}: {msg}") from None
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise ValueError(f"{path} is not a filtersurgery training state")
    return state


def peek_training_state(path: str) -> Dict[str, Any]:
    """The ``extra`` dict of a :func:`save_training_state` file, without reading its tensors
    (memory-mapped load). An unreadable or foreign file gives ``{}``: the run that loads it
    for real reports the error."""
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            AttributeError, KeyError, IndexError):
        return {}
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        return {}
    extra = state.get("extra")
    return dict(extra) if isinstance(extra, dict) else {}


def remove_empty_dir(directory) -> bool:
    """Remove ``directory`` if it exists and is empty (a finished run's ``.work/``); True if removed."""
    try:
        os.rmdir(directory)
        return True
    except OSError:  # missing, not empty, or not removable: leave it
        return False


def rng_state() -> Dict[str, Any]:
    """All RNG states (Python, NumPy, torch CPU, every CUDA device) in a weights_only-safe form."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore RNG states saved by :func:`rng_state` (CUDA states only for devices present)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    nps = state["numpy"]
    np.random.set_state((nps[0], nps[1].numpy().astype(np.uint32), nps[2], nps[3], nps[4]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda[:n]])
