"""Training images/s on 1 and N processes (torchrun, DistributedDataParallel), flowers5.

    python benchmarks/ddp_throughput.py                                  # 1 and 2 processes on this CPU (gloo)
    python benchmarks/ddp_throughput.py --nproc 1 2 --batches 10 --reps 2
    python benchmarks/ddp_throughput.py --device cuda --nproc 1 2 4 8    # N GPUs (NCCL), one process each

``configs/flowers5.yaml`` as shipped (in memory, ``data.batch_size`` 64 = the global batch), built by
the real ``Trainer`` in every process of a ``torchrun --standalone --nproc-per-node N`` launch of this
script. Each measurement times ``--batches`` global batches of ``Trainer.train_one_epoch`` after
``--warmup`` untimed ones (DDP's first steps build its buckets), ``--reps`` times; the fastest
repetition counts. Rank 0 keeps the clock: every step ends in DDP's gradient all-reduce, so its
clock is the group's. On the CPU each process gets ``--threads-each`` threads (default 1: a core
each, as each process gets its own GPU), so the last line, the scaling efficiency
(images/s with N processes) / (N x images/s with 1), says what DDP costs; on a 2-core machine
shared with other work, N = 2 also means the processes compete with that work.

Decoding the photos happens once per process before the clock starts (``data.subset`` keeps the
training share small by default: only the timed batches are needed).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin on 2 shared cores

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(args: argparse.Namespace) -> None:
    """One process of the launch: train ``warmup + batches`` steps ``reps`` times; rank 0 reports."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from flowers_throughput import FirstBatches, StepClock

    from cnnvis.config import load_config
    from cnnvis.training.trainer import Trainer

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads_each)
    config = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory() as runs:
        trainer = Trainer(config, runs_dir=runs, device=args.device)
        batches, total = trainer.data.train, args.warmup + args.batches
        if len(batches) < total:
            raise SystemExit(f"--warmup + --batches must be <= {len(batches)} (training batches in one epoch)")
        times = []
        for _ in range(args.reps):
            clock = StepClock(args.warmup, total)
            trainer.data.train = FirstBatches(batches, total)
            trainer.state.steps_per_epoch = total
            trainer.listeners = [clock] if trainer.world.is_main else []
            trainer.train_one_epoch()
            if trainer.world.is_main:
                times.append(clock.seconds())
        if trainer.world.is_main:
            Path(args.result).write_text(json.dumps({
                "processes": trainer.world.size, "threads_each": torch.get_num_threads(), "device": str(trainer.device),
                "batch": config.data.batch_size, "images": config.data.transforms.image_size, "times": times}))
        trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "flowers5.yaml")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    parser.add_argument("--batches", type=int, default=10, help="timed global batches per repetition")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches before each repetition (>= 1)")
    parser.add_argument("--reps", type=int, default=2, help="repetitions per process count; the fastest counts")
    parser.add_argument("--threads-each", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.warmup < 1 or args.batches < 1:
        sys.exit("--warmup and --batches must be >= 1")
    overrides = list(args.overrides)
    if not any(o.startswith("data.root=") for o in overrides):
        overrides.append(f"data.root={REPO.parent / 'shared' / 'data'}")
    if not any(o.startswith("data.subset=") for o in overrides):
        overrides.append("data.subset=1024")  # decoding is not timed: decode what is trained on, and some
    overrides += ["data.in_memory=true", "log.tensorboard=false"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nproc:
            result = Path(tmp) / f"{n}.json"
            each = args.threads_each
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                       __file__, "--worker", "--config", str(args.config), "--device", args.device,
                       "--batches", str(args.batches), "--warmup", str(args.warmup), "--reps", str(args.reps),
                       "--threads-each", str(each), "--result", str(result),
                       *(arg for o in overrides for arg in ("--set", o))]
            env = {**os.environ, "OMP_NUM_THREADS": str(each)}
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600, check=False)
            if done.returncode or not result.is_file():
                sys.exit(f"{n} process(es) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            results.append(json.loads(result.read_text()))
            r = results[-1]
            rate = args.batches * r["batch"] / min(r["times"])
            reps = ", ".join(f"{args.batches * r['batch'] / t:.1f}" for t in r["times"])
            print(f"  {n} process(es) x {r['threads_each']} thread(s) on {r['device']}: {rate:.1f} images/s "
                  f"(reps: {reps})", flush=True)
    import torch

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({len(os.sched_getaffinity(0))} cores)"
    print(f"\ntorch {torch.__version__}; {device}; {args.config.name}, global batch {results[0]['batch']}, "
          f"{results[0]['images']} px crops; {args.warmup} warm-up + {args.batches} timed batches, best of {args.reps}")
    base = args.batches * results[0]["batch"] / min(results[0]["times"]) * (1 / results[0]["processes"])
    print(f"{'processes':>9} {'threads each':>12} {'images/s':>9} {'speed-up':>9} {'efficiency':>10}")
    for r in results:
        rate = args.batches * r["batch"] / min(r["times"])
        n = r["processes"]
        print(f"{n:>9} {r['threads_each']:>12} {rate:>9.1f} {rate / (base * results[0]['processes']):>8.2f}x "
              f"{rate / (base * n):>9.0%}")
    last = results[-1]
    rate = args.batches * last["batch"] / min(last["times"])
    print(f"scaling efficiency, {last['processes']} processes vs {results[0]['processes']}: "
          f"{rate / (base * last['processes']):.0%}")


if __name__ == "__main__":
    main()
