"""torchrun environment -> DDP / FSDP2 on PyTorch's own engine; a no-op in one process.

gradtune has no cluster layer of its own: ``torchrun`` starts the processes and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; this module reads them, and the loop stays the loop.

Why a run means the same thing at any world size:
  * ``batch_size`` (and ``micro_batch_size``) are *global*. Every rank computes the same step
    indices (data/sampler.Sampler is a pure function of seed, epoch, index) and takes its
    contiguous share of each micro-batch (``shard``), so no sample is duplicated or dropped.
  * Objectives return loss *sums* and counts. Gradients of sums are summed across ranks (not
    averaged), the counts are summed too, and the loop divides once by the global count: the
    update is the single-process update up to float summation order.
  * A rank whose share is empty (tail of a batch, micro-batch smaller than the world) still runs
    forward/backward on zero samples, so it joins every collective: no hang, zero contribution.

Hence each rank holds micro_batch_size / N samples at a time, so
all ranks run the same number of forward/backward passes per step (FSDP2 needs the lockstep).

Checkpoints and resume. DDP: rank 0 writes the unwrapped weights once (``on_main``), every rank
reads them. FSDP2: every rank writes its shards (torch.distributed.checkpoint), see
gradtune/state/sharded.py. The data position is (epoch, index) in the *global*
sample order, so it does not depend on the world size: a run resumed with another number of
processes loads the weights exactly (DCP reshards) and continues with the very same batches;
its later updates equal the original ones up to float summation order (bit-exact only at the same
world size). Dropout masks are drawn per rank from the same seed: runs with dropout > 0 are not
equal across world sizes.

DDP or our own all-reduce? We wrap with DistributedDataParallel (bucketing, overlap of the
all-reduce with backward, ``no_sync`` for accumulation) but register a communication hook that
*sums* the buckets: DDP's default hook divides by the world size, which for sum-losses would
need a multiply-back (an extra rounding for world sizes that are not powers of two). FSDP2 gets
the same treatment with ``set_gradient_divide_factor(1.0)``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import os
import socket
import sys
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose: torch.distributed.nn's functions take
# ``group=group.WORLD`` as a default argument, evaluated on import. DDP's constructor imports it
# (through torch._dynamo); imported after init_process_group, those defaults would hold the default
# group for the life of the process: destroy_process_group could not free it, and its gloo worker
# threads would still run while Python finalizes (std::terminate, SIGABRT, at exit).
import torch.distributed.nn  # noqa: F401
from torch import nn

from gradtune.runtime import collector
from gradtune.runtime.errors import GradtuneError

_STATE: dict[str, Any] = {"mode": "none"}


# --- environment ---------------------------------------------------------------------------------
def launched() -> bool:
    """True when torchrun (or any launcher setting WORLD_SIZE) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank; from torchrun's RANK before the group exists or after it is torn down."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def where() -> str:
    """'rank 1/2 on host' for messages; empty in one process."""
    if not (active() or launched()):
        return ""
    r = dist.get_rank() if active() else int(os.environ.get("RANK", "0"))
    return f"rank {r}/{os.environ.get('WORLD_SIZE', world_size())} on {socket.gethostname()}"


def device(base: torch.device) -> torch.device:
    """Under torchrun each process owns the GPU of its LOCAL_RANK; 'cuda' means that one."""
    if base.type == "cuda" and base.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return base


def init(dev: torch.device, timeout_s: float) -> torch.device:
    """Join the process group (idempotent); returns this rank's device.

    NCCL for GPUs (with gloo for CPU-side collectives), gloo on CPU. ``timeout_s`` bounds every
    collective: a dead or hung peer fails the run in bounded time, not after the 30-minute default.
    """
    dev = device(dev)
    if not launched() or dist.is_initialized():
        return dev
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    _STATE["timeout_s"] = timeout_s
    timeout = datetime.timedelta(seconds=timeout_s)
    # torchrun --max-restarts reuses its store across attempts; keys left by a dead attempt (a
    # peer's old address) would send the new one to a closed port. One key space per attempt.
    store, r, n = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"gradtune/attempt{attempt}/", store), rank=r, world_size=n, timeout=timeout
    )
    return dev


def _drop_dtensor_caches() -> None:
    """DTensor's caches (sharding propagation in C++ and Python, redistribution plans, mesh
    topologies) keep DTensorSpecs and meshes, and a mesh holds its process group: after
    destroy_process_group its gloo threads would live on into the interpreter's teardown and can
    abort it (std::terminate, SIGABRT). Emptied here; they refill on the next DTensor op."""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor in this process (DDP, one process)
        return
    clear_fast = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_fast is not None:
        clear_fast()
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith("torch.distributed.tensor"):
            continue
        for obj in list(vars(mod).values()):
            for fn in (obj, *vars(obj).values()) if isinstance(obj, type) else (obj,):
                fn = getattr(fn, "__func__", fn)  # a cached staticmethod
                if isinstance(fn, functools._lru_cache_wrapper):
                    fn.cache_clear()
        if callable(getattr(mod, "clear_redistribute_planner_cache", None)):
            mod.clear_redistribute_planner_cache()
    api = sys.modules.get("torch.distributed.tensor._api")
    prop = getattr(getattr(getattr(api, "DTensor", None), "_op_dispatcher", None), "sharding_propagator", None)
    if callable(getattr(getattr(prop, "propagate_op_sharding", None), "cache_clear", None)):
        prop.propagate_op_sharding.cache_clear()  # per-instance (and per-thread) cache


def shutdown() -> None:
    """Leave the process group. Its gloo threads stop once the last reference goes: ours (the
    mesh, DTensor's caches) are dropped here; a sharded model the caller still holds keeps it
    until that model is freed."""
    for key in ("mesh", "vote", "agreed"):
        _STATE.pop(key, None)
    _STATE["mode"] = "none"
    if dist.is_available() and dist.is_initialized():
        _drop_dtensor_caches()
        gc.collect()  # FSDP modules already dropped but still in reference cycles
        dist.destroy_process_group()


@contextlib.contextmanager
def session(dev: torch.device, timeout_s: float) -> Iterator[None]:
    """Process group for one ``train``, torn down however the body ends (an error too: the group
    must not outlive the interpreter, see ``shutdown``). gloo's teardown is local, so it does not
    wait for a peer that died."""
    owner = launched() and not dist.is_initialized()
    init(dev, timeout_s)
    try:
        yield
    finally:
        if owner:
            shutdown()


# --- which parallelism ---------------------------------------------------------------------------
def _memory_per_process(dev: torch.device) -> float:
    if dev.type == "cuda":
        return float(torch.cuda.get_device_properties(dev).total_memory)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return pages / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def choose(mode: str, model: nn.Module, optimizer: str, dev: torch.device) -> str:
    """'none' in one process; ``auto``: DDP when a full replica (weights, grads, optimizer state)
    takes under half of a process's memory, leaving the rest for activations; FSDP2 otherwise."""
    if not active():
        return "none"
    if mode == "none":
        raise GradtuneError(
            f"config: distributed=none but torchrun started {world_size()} processes; "
            "use ddp, fsdp or auto (or launch one process)"
        )
    if mode != "auto":
        return mode
    states = 2 if optimizer in ("adamw", "muon") else 1  # muon: AdamW's two for embeddings and head
    replica = sum(p.numel() * p.element_size() for p in model.parameters()) * (2 + states)
    if replica < 0.5 * _memory_per_process(dev):
        return "ddp"
    if optimizer == "muon":  # Newton-Schulz needs each whole matrix; a shard's rows are not one
        raise GradtuneError(
            "optimizer=muon orthogonalises whole matrices and this model needs FSDP, which shards them: "
            "use optimizer=adamw, or fewer parameters per process"
        )
    return "fsdp"


def _sum_hook(group, bucket):  # no annotations: DDP checks them, and ours are strings here
    """DDP communication hook: all-reduce SUM of the gradient-of-sums (no 1/world division).
    (group: None for the default group; bucket: dist.GradBucket -> Future[Tensor])"""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _shard_fsdp(model: nn.Module, dev: torch.device) -> nn.Module:
    """FSDP2: one unit per element of every ModuleList (transformer blocks), then the root, so
    only one block's full weights exist at a time. Gradients are reduce-scattered as sums.

    One explicit mesh for every unit, on the training device: FSDP2's default mesh would take the
    machine's accelerator (CUDA) even for a CPU run, and one mesh is one reference to drop."""
    with collector.paused():  # FSDP2 brings DTensor, sympy and more: loaded, never garbage
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

    mesh = _STATE["mesh"] = init_device_mesh(dev.type, (world_size(),))
    for mod in list(model.modules()):
        if isinstance(mod, nn.ModuleList):
            for block in mod:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for mod in model.modules():
        if is_sharded(mod):  # per unit: the setters do not recurse
            mod.set_gradient_divide_factor(1.0)
            mod.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model


def wrap(
    model: nn.Module, mode: str, dev: torch.device, param_groups: Optional[list[dict[str, Any]]] = None
) -> tuple[nn.Module, Optional[list[dict[str, Any]]]]:
    """Wrap for ``mode`` (from ``choose``); returns (model to call, param groups for the optimizer).

    FSDP2 shards in place and replaces each Parameter with a DTensor one, so optimizer groups built
    before sharding are re-pointed by name. DDP keeps the module's own parameters.
    """
    _STATE["mode"] = mode
    if mode == "none":
        return model, param_groups
    if mode == "ddp":
        ids = [dev.index] if dev.type == "cuda" else None
        with collector.paused():  # DDP's constructor imports torch._dynamo: loaded, never garbage
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp, param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    model = _shard_fsdp(model, dev)
    if param_groups is None:
        return model, None
    now = dict(model.named_parameters())
    return model, [{**g, "params": [now[names[id(p)]] for p in g["params"]]} for g in param_groups]


def is_sharded(model: nn.Module) -> bool:
    """FSDP2-sharded (checkpoints written by every rank) rather than replicated (rank 0 writes)."""
    return hasattr(model, "set_requires_gradient_sync")  # FSDP2 turns the module into an FSDPModule


def reshard(model: nn.Module) -> None:
    """Back to the sharded parameters (local, no communication). FSDP2 leaves the root's full
    weights registered after a forward without backward (an evaluation); the optimizer, and
    checkpoints, know the sharded Parameters."""
    for mod in model.modules():
        if is_sharded(mod):
            mod.reshard()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module (no ``module.`` prefix); FSDP2 shards in place, so it is the module."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --- one step ---------------------------------------------------------------------------------------
def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a micro-batch's indices; sizes differ by at most one, and
    may be zero (the rank then contributes a zero gradient but still joins the collectives)."""
    if not active():
        return idx
    return idx.tensor_split(dist.get_world_size())[dist.get_rank()]


@contextlib.contextmanager
def grad_sync(model: nn.Module, last: bool) -> Iterator[None]:
    """Around forward+backward of a micro-batch: communicate gradients only on the ``last`` one."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last:
        with model.no_sync():
            yield
        return
    if is_sharded(model):
        model.set_requires_gradient_sync(last)
    yield
    if last and active() and not isinstance(model, nn.parallel.DistributedDataParallel) and not is_sharded(model):
        # A plain module in a multi-process run (e.g. lr-find): sum the gradients ourselves.
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)


def all_reduce_sums(
    loss_sum: torch.Tensor, count: torch.Tensor, sums: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Global (loss sum, count, metric sums) in one float64 all-reduce; every rank gets the same
    numbers, so guard, stopping and logging decisions agree everywhere."""
    if not active():
        return loss_sum, count, sums
    keys = sorted(sums)
    dev = loss_sum.device
    # count may be a Python int (tabular rows) or a tensor (token counts); the last entry is the
    # stop vote (``vote_stop``), riding along for free.
    packed = torch.stack(
        [
            loss_sum.detach().double(),
            torch.as_tensor(count, dtype=torch.float64, device=dev),
            *(torch.as_tensor(sums[k]).double().to(dev) for k in keys),
            torch.tensor(float(_STATE.get("vote", False)), dtype=torch.float64, device=dev),
        ]
    )
    dist.all_reduce(packed)
    _STATE["agreed"] = bool(packed[-1] > 0)
    return packed[0], packed[1], {k: packed[2 + i] for i, k in enumerate(keys)}


def vote_stop(wish: bool) -> None:
    """This rank's wish to stop at the next step boundary (it got SIGTERM/SIGINT), cast before
    the step; the step's ``all_reduce_sums`` carries it, so after the step every rank reads the
    same ``stop_agreed()``. Ranks hit by a signal at different moments (torchrun, Ctrl-C) then
    checkpoint at the same step, instead of one entering a checkpoint's collectives while another
    runs the next step's (mismatched collectives hang or mix data)."""
    _STATE["vote"] = bool(wish)


def stop_agreed(wish: bool) -> bool:
    """After a step: stop now? One process: its own ``wish``; under torchrun: the ranks' vote."""
    return bool(_STATE.get("agreed", False)) if active() else wish


def plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 norms, parameters) as an ordinary full tensor; others unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# --- output and checkpoints ---------------------------------------------------------------------------
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unwrapped, unsharded weights on CPU, on rank 0 (other ranks get {}). Collective under FSDP."""
    model = unwrap(model)
    if not is_sharded(model):
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()} if is_main() else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=opts)
    if not is_main():
        return {}
    state = {k: v.contiguous() for k, v in state.items()}
    # Tied weights come back as separate copies; share them again, as in model.state_dict(), so
    # that callers store them once (models/weights.dedupe) whatever the parallelism.
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in state and first.setdefault(id(p), name) != name:
            state[name] = state[first[id(p)]]
    return state


# --- errors ---------------------------------------------------------------------------
def describe(exc: BaseException) -> str:
    """An error message that names the rank it came from, and explains a failed collective."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    who = where()
    if not who:
        return text
    lowered = text.lower()
    if isinstance(exc, dist.DistBackendError) or any(
        s in lowered for s in ("connection closed by peer", "connection reset", "timed out", "broken pipe")
    ):
        timeout = _STATE.get("timeout_s")
        text = (
            f"a peer process died or stopped responding during a collective "
            f"(dist_timeout={timeout}s); torchrun names the rank that failed first. ({text})"
        )
    return f"{who}: {text}"
