"""Distributed facts in one place: which process this is, who writes, and how results meet.

``torchrun --nproc_per_node N -m loraqa.cli train ...`` (or ``accelerate launch``) starts N processes and gives
each ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in its environment. Every process trains its share of each
batch (the Trainer wraps the model in ``DistributedDataParallel``), answers its share of the dev questions, and
only the main process (rank 0) writes the run folder. A single process (no launcher) is world size 1, where every
function here is a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.distributed as tdist

from .devices import resolve_device


def _joined() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if _joined() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return tdist.get_rank() if _joined() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def init(device: str | None = None) -> torch.device:
    """This process's device, joining the launcher's process group first when there is one.

    On GPUs each process takes ``cuda:LOCAL_RANK`` (``--device cuda`` means that too) and NCCL; on CPUs gloo.
    The Trainer (through accelerate) finds the group already joined and uses it.
    """
    dev = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return dev
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not _joined():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev


def close() -> None:
    """Leave the process group (torchrun warns about a group left open at exit)."""
    if _joined():
        tdist.destroy_process_group()


@contextlib.contextmanager
def session():
    """Leave the process group when the block ends: after a :func:`barrier` when it ended well, at once when it
    raised. The barrier keeps the main process, done first, from tearing its gloo sockets down while the others
    may still be reading its last broadcast, which aborts them (SIGABRT) at the end of a finished run. No barrier
    after an error: a process that raised alone would wait there for the others until the timeout."""
    try:
        yield
    except BaseException:
        close()
        raise
    barrier()
    close()


def barrier() -> None:
    if _joined() and world_size() > 1:
        tdist.barrier()


def on_main(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on the main process only, the others waiting; every process returns its result, or
    raises its exception (so a refused run folder stops all processes with the same message, none hangs)."""
    if not _joined() or world_size() == 1:
        return fn(*args, **kwargs)
    box = [None]
    if is_main_process():
        try:
            box = [(True, fn(*args, **kwargs))]
        except Exception as e:  # noqa: BLE001 -- re-raised below, on every process
            box = [(False, e)]
    tdist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def share(n: int, world: int, rank: int) -> slice:
    """Process ``rank``'s contiguous share of ``n`` items among ``world`` processes (sizes differ by one at most)."""
    return slice(n * rank // world, n * (rank + 1) // world)


def shard(n: int) -> slice:
    """This process's share of ``n`` items: all of them unless it joined a process group, since only then can
    :func:`gather_lists` put the shares back together (a launcher's ``WORLD_SIZE`` alone is not enough)."""
    if not _joined():
        return slice(0, n)
    return share(n, tdist.get_world_size(), tdist.get_rank())


def gather_lists(items: list) -> list:
    """Every process's list, concatenated in rank order, on every process (the inverse of :func:`shard`)."""
    if not _joined() or world_size() == 1:
        return list(items)
    parts = [None] * world_size()
    tdist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def _reduce(value: float, op) -> float:
    """``value`` combined over the processes by one all-reduce of a single number (no pickling, unlike
    :func:`gather_lists`: the interrupt check runs at every step end). NCCL reduces only tensors on the GPU."""
    if not _joined() or world_size() == 1:
        return value
    on = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else None
    t = torch.tensor([value], dtype=torch.float64, device=on)  # exact for integers below 2**53
    tdist.all_reduce(t, op=op)
    return type(value)(t.item())


def sum_across(value: float) -> float:
    """The sum of ``value`` over the processes (an int stays an int)."""
    return _reduce(value, tdist.ReduceOp.SUM)


def max_across(value: float) -> float:
    """The largest ``value`` over the processes (an int stays an int)."""
    return _reduce(value, tdist.ReduceOp.MAX)


def unwrap(model):
    """The model inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper; the model itself otherwise."""
    from accelerate.utils import extract_model_from_parallel

    # every wrapper accelerate unwraps gives its model as .module (FSDP's is a property, not a submodule), a
    # compiled one as ._orig_mod; anything else is its own inner model, and accelerate would still walk all its
    # submodules for compiled regions (~1,000 on SmolLM2, 7 ms at every training step)
    if not hasattr(model, "module") and not hasattr(model, "_orig_mod"):
        return model
    return extract_model_from_parallel(model)


def call_as_forward(model, fn, *args, **kwargs):
    """``fn(unwrap(model), *args, **kwargs)``, run as the forward pass of ``model``'s wrapper where it has one.

    DistributedDataParallel averages the gradients only of a backward pass that follows a forward pass through the
    wrapper (its forward arms the all-reduce hooks); a loss that calls the inner model's parts directly (the
    labelled-positions loss calls the decoder and the output layer) would leave each process training alone. So
    ``fn`` becomes the inner model's forward for one call through the wrapper. torch has no public hook for
    this (FSDP has ``register_fsdp_forward_method``, DDP has none), hence the instance attribute.
    """
    inner = unwrap(model)
    if inner is model:
        return fn(model, *args, **kwargs)
    inner.forward = functools.partial(fn, inner)  # shadows the class's forward for this one call
    try:
        return model(*args, **kwargs)
    finally:
        del inner.forward
