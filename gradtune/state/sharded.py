"""FSDP2 checkpoints: the folders of checkpoint.py, with the weights and the optimizer state as
torch.distributed.checkpoint (DCP) shards that every rank writes in parallel.

    step-00001234/
      shards/           DCP: one __R_0.distcp per rank, and .metadata (its index). Weights under
                        ``model.<name>``, optimizer tensors under ``optim.state.<name>.<key>``
      optimizer.json    the rest of the optimizer state (param groups...), by parameter name
      state.safetensors, state.json, config.json   as in checkpoint.py; state.json's
                        ``optimizer`` is ``IN_SHARDS``
      manifest.json     sha256 and size of every file above; written last, by rank 0

Writing (``save``, every rank calls it): rank 0 sweeps leftovers and makes ``.tmp-step-...``;
every rank writes its shards there (DCP's coordinator writes ``.metadata`` once all are); rank 0
then writes the loop state and the manifest last, and renames the folder into place. A kill at
any moment leaves the previous checkpoints and maybe a ``.tmp-*`` folder, which is never read and
is swept by the next write; a folder under its final name is complete.

Reading: ``load`` verifies the manifest as checkpoint.load does and gives the weights' names,
shapes and dtypes as meta tensors (so resume.plan checks them like any checkpoint's);
``restore`` (collective under torchrun) reads the tensors into the live model and optimizer at
this world size, whatever the one that wrote them: DCP reshards; one process reads them too.

Why not DCP's own pickles: ``.metadata`` is a pickle, and DCP stores non-tensor values as pickles
it loads with ``weights_only=False``. Here every non-tensor is JSON, only tensor entries are
accepted, and ``.metadata`` is unpickled with an allow-list of DCP's index classes: a crafted
checkpoint is refused, never run. (torch.distributed.checkpoint is imported lazily: it costs
over a second, and most runs never shard.)
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from gradtune.runtime import distributed, rank_zero, testhooks
from gradtune.runtime.atomic import fsync_dir
from gradtune.runtime.errors import GradtuneError
from gradtune.state import checkpoint

FORMAT = "sharded-1"
SHARDS = "shards"
FILES = ("optimizer.json", "state.safetensors", "state.json", "config.json")
IN_SHARDS = {"in": "shards"}  # state.json's optimizer: it is in shards/ + optimizer.json
_INDEX = f"{SHARDS}/.metadata"


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / SHARDS).is_dir()


# --- optimizer state by parameter name (torch numbers parameters; names survive resharding) ---
def _names(module: nn.Module, opt: torch.optim.Optimizer) -> list[list[str]]:
    """Each optimizer group's parameter names, in the optimizer's order."""
    names = {id(p): n for n, p in module.named_parameters()}
    if any(id(p) not in names for g in opt.param_groups for p in g["params"]):
        raise GradtuneError("the optimizer holds parameters that are not the model's")
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def _by_name(module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    flat = [n for group in _names(module, opt) for n in group]
    sd = opt.state_dict()
    return {
        "state": {flat[i]: v for i, v in sd["state"].items()},
        "param_groups": [{**g, "params": [flat[i] for i in g["params"]]} for g in sd["param_groups"]],
    }


def _by_index(folder: Path, tree: Any, module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    groups = _names(module, opt)
    index = {n: i for i, n in enumerate(n for group in groups for n in group)}
    try:
        saved = [g["params"] for g in tree["param_groups"]]
        state = {index[n]: v for n, v in tree["state"].items()}
    except (KeyError, TypeError) as e:
        raise GradtuneError(f"checkpoint {folder}: optimizer.json does not fit this optimizer ({e!r})") from None
    if saved != groups:
        raise GradtuneError(f"checkpoint {folder}: its optimizer parameter groups differ from this run's")
    return {
        "state": state,
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in tree["param_groups"]],
    }


# --- writing ------------------------------------------------------------------------------------
def _write_error(root: Path, final: Path, why: str) -> checkpoint.WriteError:
    good = checkpoint.newest_step(root)
    last = f"step {good} ({root / checkpoint.folder_name(good)})" if good is not None else "none yet"
    return checkpoint.WriteError(f"cannot write checkpoint {final}: {why}; last good checkpoint: {last}")


def _first_failure(e: BaseException) -> BaseException:
    """The first rank's exception inside DCP's CheckpointException (it gathers them per rank)."""
    for wrapped in (getattr(e, "failures", None) or {}).values():
        return wrapped[0] if isinstance(wrapped, tuple) else wrapped
    return e


def _open(root: Path, tmp: Path, final: Path) -> None:
    """Rank 0, before any rank writes: a clean temporary folder (one name for every rank)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        checkpoint.sweep(root)
        (tmp / SHARDS).mkdir(parents=True)
    except OSError as e:
        raise _write_error(root, final, e.strerror or str(e)) from None


def _disk_full(path: Path) -> bool:
    """Less than 1 MiB left where ``path`` lives (a write that failed for want of space)."""
    try:
        return shutil.disk_usage(path if path.exists() else path.parent).free < 1 << 20
    except OSError:
        return False


def _write_shards(tmp: Path, final: Path, tensors: dict[str, Any]) -> None:
    """Every rank writes its shards; DCP gathers the outcome, so every rank raises alike."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp_save(tensors, storage_writer=FileSystemWriter(tmp / SHARDS, thread_count=1, sync_files=True))
        return
    except CheckpointException as e:  # a BaseException: it must not escape as a traceback
        failure = _first_failure(e)
    except OSError as e:
        failure = e
    if not isinstance(failure, OSError) and _disk_full(tmp):
        # torch's zip writer reports a short write on a full disk as a RuntimeError ("unexpected
        # pos"): the cause is the disk, so the run exits 74 (resumable) like any ENOSPC.
        failure = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(failure, OSError):
        raise _write_error(tmp.parent, final, failure.strerror or str(failure)) from None
    raise RuntimeError(f"writing the shards of {final} failed: {type(failure).__name__}: {failure}") from None


def _commit(
    root: Path,
    tmp: Path,
    final: Path,
    step: int,
    optim_tree: Any,
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int,
) -> Path:
    """Rank 0, once every shard is written: the loop state, the manifest last, the rename."""
    try:
        tensors: dict[str, torch.Tensor] = {}
        state_json = checkpoint.split_tensors(state, "state", tensors)
        checkpoint._write_json(tmp / "optimizer.json", optim_tree)
        checkpoint._write_tensors(tmp / "state.safetensors", tensors)
        checkpoint._write_json(tmp / "state.json", state_json)
        checkpoint._write_json(tmp / "config.json", config)
        testhooks.hit("ckpt.files")
        names = [*FILES, *(f"{SHARDS}/{n}" for n in sorted(os.listdir(tmp / SHARDS)))]
        checkpoint.write_manifest(tmp, names, FORMAT, step, config["hash"])
        fsync_dir(tmp / SHARDS)
        fsync_dir(tmp)
        testhooks.hit("ckpt.rename")
        checkpoint.into_place(root, tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(root, final, e.strerror or str(e)) from None
    testhooks.hit("ckpt.after")
    checkpoint.prune(root, keep)
    return final


def save(
    root: Path,
    step: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    config: dict[str, Any],
    config_hash: str,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and keep the newest ``keep``; every rank
    calls it. ``state``: the loop's state, its optimizer entry ``IN_SHARDS``. Raises WriteError
    (every rank) when the disk refuses; the previous checkpoints are untouched."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    final = root / checkpoint.folder_name(step)
    tmp = root / f".tmp-{final.name}"
    rank_zero.on_main(_open, root, tmp, final)
    module = distributed.unwrap(model)
    distributed.reshard(module)
    optim_tensors: dict[str, torch.Tensor] = {}
    optim_tree = checkpoint.split_tensors(_by_name(module, opt), "optim", optim_tensors)
    _write_shards(tmp, final, {"model": get_model_state_dict(module), **optim_tensors})
    testhooks.hit("ckpt.model")
    return rank_zero.on_main(
        _commit, root, tmp, final, step, optim_tree, state, {"hash": config_hash, "config": config}, keep
    )


# --- verifying and reading ----------------------------------------------------------------------
def _inside(name: Any) -> bool:
    """A manifest name that stays in the folder: one of FILES or a plain file name in shards/."""
    if name in FILES:
        return True
    rest = name[len(SHARDS) + 1 :] if isinstance(name, str) and name.startswith(f"{SHARDS}/") else ""
    return rest not in ("", ".", "..") and "/" not in rest and "\\" not in rest


def verify(folder: Path) -> Optional[str]:
    """None if ``folder`` is a complete, untampered sharded checkpoint; else why not (one phrase)."""
    files, why = checkpoint.read_manifest(folder, FORMAT)
    if why:
        return why
    if not isinstance(files, dict) or not {*FILES, _INDEX} <= set(files):
        return f"manifest lists {sorted(files) if isinstance(files, dict) else files!r}, expected {[*FILES, _INDEX]}"
    outside = [name for name in files if not _inside(name)]
    if outside:
        return f"manifest names a file outside the checkpoint: {outside[0]!r}"
    return checkpoint.check_files(folder, files)


class _IndexUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` holds dataclasses of its own, torch.Size, dtypes and a path; nothing else
    is built (a planted callable is refused, not called)."""

    def find_class(self, module: str, name: str) -> Any:
        ok = (module, name) in {
            ("torch", "Size"),
            ("torch.serialization", "_get_layout"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        }
        if module == "torch":
            ok = ok or isinstance(getattr(torch, name, None), torch.dtype)
        if module == "torch.distributed.checkpoint.metadata":
            import torch.distributed.checkpoint.metadata as md

            found = getattr(md, name, None)
            ok = isinstance(found, type) and found.__module__ == module  # its dataclasses and enum
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")
        return super().find_class(module, name)


def _index(folder: Path) -> Any:
    """The DCP index of ``folder``'s shards, checked: tensor entries only, in files the manifest lists."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

    try:
        with open(folder / _INDEX, "rb") as f:
            md = _IndexUnpickler(f).load()
        listed = set(json.loads((folder / "manifest.json").read_text())["files"])
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise GradtuneError(f"checkpoint {folder}: {_INDEX} is not a readable index ({e})") from None
    if not (
        isinstance(md, Metadata) and isinstance(md.state_dict_metadata, dict) and isinstance(md.storage_data, dict)
    ):
        raise GradtuneError(f"checkpoint {folder}: {_INDEX} is not a torch.distributed.checkpoint index")
    other = sorted(k for k, v in md.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata))
    if other:
        raise GradtuneError(
            f"checkpoint {folder}: {_INDEX} holds non-tensor entries {other[:3]} (not written by gradtune)"
        )
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or f"{SHARDS}/{rel}" not in listed or not _inside(f"{SHARDS}/{rel}"):
            raise GradtuneError(f"checkpoint {folder}: {_INDEX} points at {rel!r}, not a file of the manifest")
    if getattr(md, "storage_meta", None) is None:
        md.storage_meta = StorageMeta()
    return md


def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights as meta tensors: names, shapes, dtypes; state tree; {"hash", "config"}) of a
    verified sharded checkpoint: what checkpoint.load gives, minus the weights' values."""
    why = verify(folder)
    if why:
        raise GradtuneError(f"checkpoint {folder}: {why}")
    md = _index(folder)
    try:
        weights = {
            k[len("model.") :]: torch.empty(tuple(v.size), dtype=v.properties.dtype, device="meta")
            for k, v in md.state_dict_metadata.items()
            if k.startswith("model.")
        }
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise GradtuneError(f"checkpoint {folder}: {_INDEX} describes an impossible tensor ({e})") from None
    tensors = checkpoint._read_tensors(folder / "state.safetensors")
    try:
        state = checkpoint.join_tensors(json.loads((folder / "state.json").read_text()), tensors)
        config = json.loads((folder / "config.json").read_text())
    except (ValueError, KeyError) as e:
        raise GradtuneError(f"checkpoint {folder}: unreadable state ({e})") from None
    if not isinstance(state, dict) or state.get("optimizer") != IN_SHARDS:
        raise GradtuneError(f"checkpoint {folder}: state.json does not point at its shards")
    return weights, state, config


def _markers(tree: Any, path: tuple) -> Iterator[tuple[tuple, str]]:
    """(path, key) of each tensor marker that checkpoint.split_tensors left in ``tree``."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            yield path, tree["__tensor__"]
            return
        for k, v in tree.items():
            yield from _markers(v, (*path, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _markers(v, (*path, i))


def _optim_targets(folder: Path, tree: Any, module: nn.Module, md: Any) -> dict[str, torch.Tensor]:
    """Tensors for DCP to read the optimizer state into: shaped like its parameter (so sharded
    like it under FSDP2) when it has the parameter's shape, else whole (step counters)."""
    params = dict(module.named_parameters())
    out = {}
    for path, key in _markers(tree, ()):
        meta = md.state_dict_metadata.get(key)
        if meta is None:
            raise GradtuneError(f"checkpoint {folder}: optimizer.json names '{key}', which {SHARDS}/ lacks")
        p = params.get(path[1]) if len(path) == 3 and path[0] == "state" else None
        if p is not None and tuple(meta.size) == tuple(p.shape):
            out[key] = torch.zeros_like(p.detach(), dtype=meta.properties.dtype)
        else:
            out[key] = torch.zeros(tuple(meta.size), dtype=meta.properties.dtype)
    return out


def restore(folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Read ``folder``'s weights and optimizer state into ``model`` and ``opt``, at this world size
    and parallelism (FSDP2, DDP or one process). Collective under torchrun. The loop state is
    ``load``'s; call this after it verified the folder."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    md = _index(folder)

    class Reader(FileSystemReader):  # DCP's reader, with the allow-listed index above
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md.storage_meta.load_id = self.load_id
            return md

    try:
        tree = json.loads((folder / "optimizer.json").read_text())
    except (OSError, ValueError) as e:
        raise GradtuneError(f"checkpoint {folder}: unreadable optimizer.json ({e})") from None
    module = distributed.unwrap(model)
    distributed.reshard(module)
    weights = get_model_state_dict(module)
    optim = _optim_targets(folder, tree, module, md)
    for key, t in [*((f"model.{k}", v) for k, v in weights.items()), *optim.items()]:
        meta = md.state_dict_metadata.get(key)
        if meta is None or tuple(meta.size) != tuple(t.shape):
            have = "absent" if meta is None else tuple(meta.size)
            raise GradtuneError(f"checkpoint {folder}: '{key}' is {have} there, {tuple(t.shape)} in this run")
    try:
        dcp_load({"model": weights, **optim}, storage_reader=Reader(folder / SHARDS))
    except CheckpointException as e:
        raise GradtuneError(f"checkpoint {folder}: the shards do not read ({_first_failure(e)})") from None
    set_model_state_dict(module, weights)
    opt.load_state_dict(_by_index(folder, checkpoint.join_tensors(tree, optim), module, opt))


def load_full(
    model: nn.Module, opt: torch.optim.Optimizer, weights: dict[str, torch.Tensor], optim_state: dict[str, Any]
) -> None:
    """A one-file checkpoint (one process or DDP wrote it) into an FSDP2-sharded model: every rank
    reads the whole tensors and keeps its own shard of each (no communication)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    distributed.reshard(model)
    # strict=False: tied weights are stored once (checkpoint.py); resume.plan checked the names.
    set_model_state_dict(
        distributed.unwrap(model), weights, options=StateDictOptions(full_state_dict=True, strict=False)
    )
    params = [p for g in opt.param_groups for p in g["params"]]

    def shard(i: int, v: Any) -> Any:
        p = params[i]
        if isinstance(v, torch.Tensor) and isinstance(p, DTensor) and tuple(v.shape) == tuple(p.shape):
            return distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        return v

    state = {int(i): {k: shard(int(i), v) for k, v in s.items()} for i, s in optim_state["state"].items()}
    opt.load_state_dict({"state": state, "param_groups": optim_state["param_groups"]})
