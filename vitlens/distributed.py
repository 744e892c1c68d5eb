"""The one place that knows ``torch.distributed``: the torchrun environment, the process group's lifetime, the
dataset shards and the cross-rank reductions that make a run over N processes give the numbers of one process.

Under ``torchrun`` every rank runs the same command on its own contiguous block of the dataset
(:func:`shard`); the streaming accumulators then add their sums and counts across ranks (:func:`all_reduce_sum`,
float64 for floats, int64 for counts: sums of sums, never averages of averages) and take maxima
(:func:`all_reduce_max`), so every rank ends with the state one process would have had; per-image outputs are
gathered in dataset order (:func:`gather_in_order`). Without ``WORLD_SIZE > 1`` every function here is a no-op
that does not even import ``torch.distributed``.

Failure: a rank that raises leaves :func:`distributed_context` through its error path, which tears the process
group down at once (gloo: its sockets close; NCCL: the communicators are aborted). A peer blocked in a collective
then fails with a connection error, which the helpers here turn into :class:`RankFailed` ("rank R: lost contact
with another rank ..."); a peer that is still computing fails at its next collective. The process group is
created with a timeout (``VITLENS_DIST_TIMEOUT`` seconds, default :data:`DEFAULT_TIMEOUT_S`), the bound for
anything the connection error does not catch (a rank that hangs rather than dies).
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitlens.errors import VitlensError

if TYPE_CHECKING:
    import torch

    from vitlens.data import ImageDataset

DEFAULT_TIMEOUT_S = 600.0
"""Seconds a collective may wait for the slowest rank before it fails (torch's own default is 30 minutes). The
ranks wait for each other only at the reductions after their local pass, so this bounds the imbalance between
shards plus the time for a hung rank to be noticed; raise it with ``VITLENS_DIST_TIMEOUT`` for very uneven data."""


class RankFailed(VitlensError):
    """A collective failed on this rank: another rank died or timed out (its own error line says why)."""


@dataclass(frozen=True)
class TorchrunEnv:
    """What ``torchrun`` (or ``srun`` with the same variables) tells each process about the job."""

    rank: int  # global rank, 0 .. world_size - 1
    world_size: int  # processes in the job, all nodes together
    local_rank: int  # rank on this node: the GPU it uses
    master_addr: str | None  # rendezvous host (None when torchrun uses its own store)
    master_port: str | None


def torchrun_env(environ: dict[str, str] | None = None) -> TorchrunEnv | None:
    """The torchrun variables of this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``), or None when ``WORLD_SIZE`` is unset or 1 (a single process: nothing to do)."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank = int(env["RANK"])
        local = int(env.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as e:
        raise VitlensError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from None
    return TorchrunEnv(rank, world, local, env.get("MASTER_ADDR"), env.get("MASTER_PORT"))


def _dist() -> Any | None:
    """``torch.distributed`` when a process group is initialised, else None (without importing anything)."""
    if "torch.distributed" not in sys.modules:
        return None
    dist = sys.modules["torch.distributed"]
    return dist if dist.is_available() and dist.is_initialized() else None


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    dist = _dist()
    return dist is not None and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    dist = _dist()
    return 0 if dist is None else dist.get_rank()


def world_size() -> int:
    """Processes in the group (1 without a process group)."""
    dist = _dist()
    return 1 if dist is None else dist.get_world_size()


def is_main() -> bool:
    """Rank 0, the one that writes files, prints and draws progress (always True in a single process)."""
    return rank() == 0


def timeout_s() -> float:
    """The collective timeout: ``VITLENS_DIST_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT_S`."""
    raw = os.environ.get("VITLENS_DIST_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise VitlensError(f"VITLENS_DIST_TIMEOUT must be a number of seconds, not {raw!r}") from None
    return value if value > 0 else DEFAULT_TIMEOUT_S


@contextmanager
def distributed_context(*, device: str = "auto") -> Iterator[TorchrunEnv | None]:
    """Join the torchrun job for the duration of the block, and leave it whatever happens.

    Without ``WORLD_SIZE > 1`` this does nothing (torch is not imported). If the process group is already
    initialised (a user's own torchrun script), it is used and left as it is. Otherwise it is created: NCCL when
    ``device`` resolves to CUDA (each rank pinned to ``cuda:LOCAL_RANK``), gloo on the CPU; the rendezvous is
    torchrun's (``env://``). On a normal exit the group is destroyed; on an error or Ctrl-C it is aborted at once,
    so that peers blocked in a collective fail instead of waiting (module docstring).

    Yields:
        The torchrun environment, or None for a single process.
    """
    env = torchrun_env()
    if env is None:
        yield None
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():  # the user's group: theirs to tear down
        yield env
        return
    # torch.distributed.fsdp's ShardedGradScaler has ``process_group=dist.group.WORLD`` as a default argument, bound
    # when the module is first imported. Imported inside a group (timm's import brings it in), it keeps the group
    # alive after destroy_process_group, and gloo's worker threads then race the interpreter's shutdown: seen as a
    # SIGABRT ("terminate called without an active exception") after a finished run, in about one run of four on
    # a loaded 2-core machine. Imported before the group exists, the default is None.
    import torch.distributed.fsdp

    from vitlens.device import resolve_device

    chosen = resolve_device(device)  # under torchrun: cuda:LOCAL_RANK (modulo the GPUs this process sees)
    use_nccl = chosen.type == "cuda" and dist.is_nccl_available()
    if use_nccl:
        _check_one_gpu_per_rank(env, torch.cuda.device_count())
        torch.cuda.set_device(chosen)
    dist.init_process_group(
        backend="nccl" if use_nccl else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s()),
        **({"device_id": chosen} if use_nccl else {}),
    )
    try:
        yield env
    except BaseException:
        _abort(dist)
        raise
    dist.destroy_process_group()


def _check_one_gpu_per_rank(env: TorchrunEnv, gpus: int) -> None:
    """NCCL needs a GPU of its own for every rank of a node. torchrun starts a node's processes with the same
    visible GPUs and says how many it started (``LOCAL_WORLD_SIZE``): every rank of the node checks that count, so
    they all stop with the same line instead of some waiting for the others at the rendezvous. Without it (a
    launcher that may give each process its own ``CUDA_VISIBLE_DEVICES``), nothing is checked here."""
    try:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or 0)
    except ValueError:
        local_world = 0
    if local_world > gpus:
        raise VitlensError(
            f"rank {env.rank}: {local_world} processes on this node but {gpus} GPU(s): NCCL needs one GPU per "
            f"process; start at most {gpus} (torchrun --nproc-per-node {gpus}), or run on the CPU with --device cpu"
        )


def _abort(dist: Any) -> None:
    """Tear the group down without waiting for peers (NCCL: abort the communicators; gloo: close the sockets)."""
    abort = getattr(sys.modules["torch.distributed.distributed_c10d"], "_abort_process_group", None)
    try:
        if abort is not None and dist.get_backend() == "nccl":
            abort()
        else:
            dist.destroy_process_group()
    except Exception:  # already broken: there is nothing left to release
        pass


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a failed collective (a dead or hung peer) into one :class:`RankFailed` line naming this rank."""
    try:
        yield
    except (RuntimeError, OSError) as e:  # DistBackendError / DistNetworkError are RuntimeErrors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:160]  # gloo prefixes its source location
        raise RankFailed(
            f"rank {rank()}: {what} failed; another rank failed first (see its error line): {first}"
        ) from e


# What gloo and NCCL say when the other end of a collective went away or never came (beyond torch's DistError).
_LOST_PEER = re.compile(
    r"closed by peer|reset by peer|broken pipe|communicator was aborted|remote process exited|timed out|timeout",
    re.I,
)


@contextmanager
def lost_peer(what: str) -> Iterator[None]:
    """Like the collectives' own guard, for work that only *contains* collectives (a DistributedDataParallel
    step's gradient all-reduce runs inside ``backward``): a connection error there becomes :class:`RankFailed`
    naming this rank; any other error (a shape mismatch, out of memory) is this rank's own and passes unchanged.
    """
    try:
        yield
    except (RuntimeError, OSError) as e:
        dist = _dist()
        if not (dist is not None and (isinstance(e, getattr(dist, "DistError", ())) or _LOST_PEER.search(str(e)))):
            raise
        with _collective(what):
            raise


def _comm_device() -> torch.device:
    import torch

    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(value: Any, op_name: str) -> Any:
    """All-reduce ``value`` (numpy array, tensor or number) with ``op_name``; same type, shape and device back.

    Floats travel as float64 and integers as int64, so counts stay exact and sums lose nothing to the transport.
    """
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return value
    import torch

    source = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    wide = torch.int64 if not (source.is_floating_point() or source.dtype == torch.bool) else torch.float64
    buffer = source.detach().to(_comm_device(), wide).contiguous()
    op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op_name]
    with _collective(f"all_reduce ({op_name})"):
        dist.all_reduce(buffer, op=op)
    if isinstance(value, torch.Tensor):
        return buffer.to(value.device, value.dtype)
    out = buffer.cpu().numpy().astype(np.asarray(value).dtype, copy=False)
    if isinstance(value, np.ndarray):
        return out
    return type(value)(out.item()) if isinstance(value, int | float | bool) else out


def all_reduce_sum(value: Any) -> Any:
    """The sum of ``value`` over all ranks (every rank gets it), in float64 (int64 for integer input).

    Reduce sums and counts and divide afterwards: a mean of per-rank means would weigh uneven shards wrongly.
    """
    return _reduce(value, "sum")


def all_reduce_max(value: Any) -> Any:
    """The elementwise maximum of ``value`` over all ranks (booleans: any)."""
    return _reduce(value, "max")


def gather_in_order(local: np.ndarray, indices: Any) -> np.ndarray:
    """Every rank's per-image rows ``local [n_rank, ...]`` (dataset indices ``indices [n_rank]``) as one array in
    dataset order, on every rank.

    Each rank sends its rows once (``all_gather_object``: pickled, so shards of different sizes need no padding);
    every rank then holds all rows, the price of giving every rank the same result object.
    """
    local = np.asarray(local)
    indices = np.asarray(indices, dtype=np.int64)
    if local.shape[0] != indices.shape[0]:
        raise VitlensError(f"{local.shape[0]} rows for {indices.shape[0]} indices")
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return local[np.argsort(indices, kind="stable")]
    parts: list[Any] = [None] * dist.get_world_size()
    with _collective("gathering per-image results"):
        dist.all_gather_object(parts, (indices, local))
    parts = [p for p in parts if len(p[0])]  # ranks that owned no image send an empty block of any shape
    all_indices = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    return rows[np.argsort(all_indices, kind="stable")]


def gather_objects(local: Any) -> list[Any]:
    """Every rank's ``local`` (any picklable object), in rank order, on every rank; ``[local]`` in one process.

    The shards are contiguous and in rank order (:func:`shard_indices`), so per-rank results concatenated in this
    order are in dataset order: the gather for results that are more than one array (e.g. faithfulness curves).
    """
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [local]
    parts: list[Any] = [None] * dist.get_world_size()
    with _collective("gathering per-image results"):
        dist.all_gather_object(parts, local)
    return parts


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (any picklable object) on every rank; ``obj`` itself in one process.

    For state that one rank reads and all need, e.g. a resume file that only rank 0's node is sure to see. The other
    ranks pass anything (None); if rank 0 fails before sending, they fail with :class:`RankFailed`.
    """
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    with _collective("receiving rank 0's state"):
        dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def shard_indices(n: int, *, block: int = 1, rank_: int | None = None, world: int | None = None) -> np.ndarray:
    """The dataset indices rank ``rank_`` (default: this one) owns out of ``n``: a contiguous run.

    The ``n`` images are cut into units of ``block`` consecutive images (the last one may be shorter) and the units
    into ``world`` contiguous runs whose sizes differ by at most one unit. Every image belongs to exactly one rank,
    none is repeated to even the shards out (a duplicate would count twice in a mean); a rank may own none.
    ``block`` keeps units whole, e.g. CKA's minibatches, so that each rank's minibatches are the single process's.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if block < 1:
        raise VitlensError(f"block must be at least 1, not {block}")
    units = -(-n // block)  # ceil
    per, extra = divmod(units, world)
    first = rank_ * per + min(rank_, extra)  # the first `extra` ranks own one unit more
    last = first + per + (1 if rank_ < extra else 0)
    return np.arange(min(n, first * block), min(n, last * block), dtype=np.int64)


def shard(dataset: ImageDataset, *, block: int = 1) -> ImageDataset:
    """This rank's part of ``dataset`` (:func:`shard_indices`), or ``dataset`` itself in a single process."""
    if not is_distributed():
        return dataset
    r, w = rank(), world_size()
    return dataset.subset(shard_indices(len(dataset), block=block, rank_=r, world=w), tag=f"rank{r}of{w}")


def global_progress(
    progress: Callable[[int, int], None] | None, total: int, *, offset: int = 0, grand_total: int | None = None
) -> Callable[[int, int], None] | None:
    """The progress callback for this rank's shard: None on ranks other than 0; on rank 0 its local count scaled to
    the whole dataset of ``total`` images (the shards advance together, so rank 0's share stands for all), plus
    ``offset`` out of ``grand_total`` for multi-pass analyses. The callback itself in a single process."""
    if progress is None or not is_distributed():
        return progress
    if not is_main():
        return None
    grand_total = total if grand_total is None else grand_total
    mine = max(1, len(shard_indices(total, rank_=0, world=world_size())))

    def scaled(done: int, _local_total: int) -> None:
        progress(offset + min(total, round(done * total / mine)), grand_total)

    return scaled
