"""Training on several processes (``torchrun``, DistributedDataParallel): everything that knows
there is more than one.

Under ``torchrun`` every process runs the same :class:`~cnnvis.training.trainer.Trainer`; it reads
its rank from the environment torchrun sets, joins the process group (NCCL on CUDA, gloo on the
CPU), trains its share of each global batch and lets DDP average the gradients. Rank 0 alone
writes the run directory. Outside torchrun every helper here is a no-op, so the single-process
path is the code it always was.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from cnnvis.device import resolve_device
from cnnvis.errors import CnnvisError, ConfigError, TrainingError

T = TypeVar("T")

#: the marker beside the runs that tells a group torchrun restarted (``--max-restarts``) which run it was writing
LAUNCH_MARKER = ".cnnvis-launch-{run_id}"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def detect_world(environ: dict[str, str] | None = None) -> World:
    """The world torchrun describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (one process without them)."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return World()
    return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))


def start(world: World, device: str, timeout_s: float) -> torch.device:
    """Join the process group of ``world`` and return this process's device: ``cuda:LOCAL_RANK``
    on a CUDA machine (one GPU per process), else the CPU, where gloo carries the collectives."""
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=timedelta(seconds=timeout_s),
                                device_id=chosen if chosen.type == "cuda" else None)
    # torchrun stops the other processes with SIGTERM when one dies (and on Ctrl-C): let that end
    # them like Ctrl-C does, so a checkpoint being written is finished rather than cut.
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))
    return chosen


def stop() -> None:
    """Leave the process group (each process once, at the end of training)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if signal.getsignal(signal.SIGTERM) is signal.default_int_handler:
        # Training is over: a SIGTERM now (torchrun ending the group) just ends the process, silently.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def decide_on_main(world: World, decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 alone, its result handed to every rank: the run directory is
    named and created once. A :class:`CnnvisError` it raises is raised on every rank alike, so
    no rank is left waiting for a rank 0 that gave up."""
    if not world.distributed:
        return decide()
    box: list[Any] = [None]
    if world.is_main:
        try:
            box[0] = ("ok", decide())
        except CnnvisError as exc:
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    outcome, value = box[0]
    if outcome == "error":
        raise value
    return value


def reduce_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over every rank, in place, on its device (no host copy)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_main(value: T) -> list[T] | None:
    """Every rank's ``value`` in rank order on rank 0 (``None`` elsewhere); ``[value]`` alone."""
    if not active():
        return [value]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def gather_predictions(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor] | None:
    """Every rank's ``(logits, targets)`` of an evaluation split, joined on rank 0 (``None``
    elsewhere): the whole split, each image once (in shard order, not the split's)."""
    parts = gather_to_main((logits, targets))
    if parts is None:
        return None
    parts = [(x, y) for x, y in parts if y.numel()] or parts[:1]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank. Without SyncBatchNorm each rank's
    statistics follow its own batches; evaluating with rank 0's makes every rank evaluate the
    weights that rank 0 saves."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def check_batch_split(batch_size: int, world: World) -> None:
    """``data.batch_size`` is the global batch: it must split evenly over the processes."""
    if batch_size % world.size:
        low, high = batch_size - batch_size % world.size, batch_size + world.size - batch_size % world.size
        raise ConfigError(
            f"data.batch_size = {batch_size} does not split evenly over {world.size} processes "
            "(it is the global batch; each process takes an equal share)",
            f"Use a multiple of {world.size}, e.g. data.batch_size={low or high}.",
        )


def wrap(model: nn.Module, world: World, device: torch.device, sync_batchnorm: bool) -> nn.Module:
    """The module the training steps call: ``model`` itself alone, else in
    :class:`DistributedDataParallel` (which shares ``model``'s parameters: the optimizer, the
    weight average and the checkpoints keep using the plain ``model``)."""
    if not world.distributed:
        return model
    if sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError("train.sync_batchnorm needs CUDA: PyTorch's SyncBatchNorm has no CPU version",
                              "Set train.sync_batchnorm=false on the CPU.")
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert converted is model  # converted in place when model is not itself a BatchNorm layer
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def loss_scale(source: object, step: int, local_count: int, world: World) -> float:
    """Factor on this rank's *summed* loss that makes DDP's average of the ranks' gradients the
    gradient of the global batch's mean loss, however the batch was split: only the tail batch of
    an on-device epoch splits unevenly (a ``DistributedSampler`` pads every rank to the same share),
    and a rank whose share is empty then adds nothing instead of the NaN of an empty mean."""
    sizes = getattr(source, "shard_sizes", None)
    total = sizes(step)[1] if sizes is not None else local_count * world.size
    return world.size / max(total, 1)


def own_rng(payload: dict[str, Any], world: World) -> dict[str, Tensor]:
    """The random state this rank resumes with: its own when the checkpoint's run had as many
    processes, else rank 0's (whose order of the data every rank shares)."""
    per_rank = payload.get("rng_per_rank") or [payload["rng"]]
    return per_rank[world.rank] if len(per_rank) == world.size else payload["rng"]


def seed_rank(seed: int, world: World, epoch: int = 0) -> None:
    """Give each rank its own random stream (dropout, MixUp), derived from the run's seed."""
    if world.distributed:
        torch.manual_seed(seed * 1000 + world.rank + 1_000_000 * epoch)


def set_epoch(source: object, epoch: int) -> None:
    """Reshuffle a ``DistributedSampler`` for ``epoch`` (its order depends on the seed and the epoch only)."""
    sampler = getattr(source, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def peer_lost(exc: BaseException, run_dir: Path) -> TrainingError | None:
    """The error to raise when ``exc`` says another training process is gone (it died, or a
    collective timed out waiting for it); ``None`` for any other error."""
    if not isinstance(exc, (dist.DistError, RuntimeError)) or not active():
        return None
    text = str(exc)
    signs = ("Connection closed by peer", "Connection reset", "Timed out", "timeout", "Broken pipe", "NCCL")
    if not isinstance(exc, dist.DistError) and not any(sign in text for sign in signs):
        return None
    # gloo starts its messages with its source file: "[.../pair.cc:545] Read error ...: Connection reset by peer."
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]).split(". ")[0][:160]
    return TrainingError(f"another training process stopped ({detail})",
                         f"checkpoints/last.pt holds the last completed epoch; continue with: cnnvis train --resume {run_dir}")


# ------------------------------------------------------------------ torchrun --max-restarts


def restarted_run(runs_dir: str | Path) -> Path | None:
    """The run a group that torchrun restarted (``--max-restarts``) was writing: it resumes from
    that run's ``last.pt`` instead of starting a new one. ``None`` outside a restart."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return None
    marker = Path(runs_dir) / LAUNCH_MARKER.format(run_id=os.environ.get("TORCHELASTIC_RUN_ID", "none"))
    try:
        run_dir = Path(runs_dir) / marker.read_text(encoding="utf-8").strip()
    except OSError:
        return None  # the first attempt died before it made a run directory: start one
    return run_dir if (run_dir / "checkpoints" / "last.pt").is_file() else None


def remember_run(runs_dir: str | Path, run_dir: Path) -> None:
    """Note which run this torchrun launch writes, for :func:`restarted_run` after a restart."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        from cnnvis.io import atomic_write

        marker = Path(runs_dir) / LAUNCH_MARKER.format(run_id=os.environ["TORCHELASTIC_RUN_ID"])
        atomic_write(marker, run_dir.name.encode("utf-8"))


def forget_run(run_dir: Path) -> None:
    """The run finished: no restart needs :func:`remember_run`'s note any more (any rank may say so)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        (run_dir.parent / LAUNCH_MARKER.format(run_id=os.environ["TORCHELASTIC_RUN_ID"])).unlink(missing_ok=True)


# ------------------------------------------------------------------ the in-process launcher


def launch(nproc_per_node: int, arguments: Sequence[str], runs_dir: str | Path = "runs", resume: str | Path | None = None) -> int:
    """``torchrun --standalone --nproc-per-node N -m cnnvis ARGUMENTS`` run in this process by
    torchrun's own launcher (``torch.distributed.run``). Returns 0 when every process ended well,
    else the exit status of the first that failed (rank 0 has said why).

    Raises :class:`TrainingError` when a process was killed (it could say nothing), naming it and
    the run to resume (``resume``, or the one this launch started in ``runs_dir``)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import config_from_args, elastic_launch, parse_args

    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node {nproc_per_node}: give at least 1", parameter="nproc_per_node")
    args = parse_args(["--standalone", "--nproc-per-node", str(nproc_per_node), "--module", "cnnvis", *arguments])
    args.rdzv_backend, args.rdzv_endpoint = "c10d", "localhost:0"  # what --standalone means (torch.distributed.run.run)
    args.rdzv_id = f"cnnvis-{os.getpid()}-{os.urandom(4).hex()}"
    # Each process gets its share of the cores (torchrun would pin 1 thread each, with a warning).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc_per_node)
                                                 if hasattr(os, "sched_getaffinity") else 1))
    for name in ("torch.distributed.run", "torch.distributed.elastic"):  # what it logs, this says in one line
        logging.getLogger(name).setLevel(logging.CRITICAL)
    config, command, command_args = config_from_args(args)
    marker = Path(runs_dir) / LAUNCH_MARKER.format(run_id=args.rdzv_id)
    try:
        elastic_launch(config=config, entrypoint=command)(*command_args)
    except SignalException as exc:  # Ctrl-C (or a kill) reached the launcher: torchrun has stopped every process
        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None  # rank 0 has said where the run stands
        raise TrainingError(f"the launcher got {exc.sigval.name} and stopped every training process",
                            "checkpoints/last.pt holds the last completed epoch.") from None
    except ChildFailedError as exc:
        # SIGTERM is how torchrun stops the others once one failed: the cause is another process
        killed = sorted((rank, f) for rank, f in exc.failures.items() if f.exitcode < 0 and -f.exitcode != signal.SIGTERM)
        spoke = sorted(f.exitcode for f in exc.failures.values() if f.exitcode > 0)
        if not killed and spoke:
            return spoke[0]
        rank, failure = (killed or sorted(exc.failures.items()))[0]
        how = f"was killed by {signal.Signals(-failure.exitcode).name}"
        run = resume or (f"{Path(runs_dir) / marker.read_text(encoding='utf-8').strip()}" if marker.is_file() else None)
        if run is None:
            raise TrainingError(f"training process rank {rank} {how} before the run directory was made") from None
        raise TrainingError(f"training process rank {rank} {how}; torchrun stopped the others",
                            f"checkpoints/last.pt holds the last completed epoch: continue with cnnvis train --resume {run}") from None
    finally:
        marker.unlink(missing_ok=True)  # only a group torchrun restarts needs it
    return 0
