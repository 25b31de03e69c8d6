"""Time to 99% MNIST test accuracy: ``configs/mnist.yaml`` vs the standard PyTorch MNIST example.

    python benchmarks/mnist_time_to_99.py                          # CPU, both sides
    python benchmarks/mnist_time_to_99.py --device cuda
    python benchmarks/mnist_time_to_99.py --max-epochs-baseline 3  # cap the slow side
    python benchmarks/mnist_time_to_99.py --only project
    python benchmarks/mnist_time_to_99.py --whole-process          # time `cnnvis train` as a user runs it

Both sides train from their own seed and evaluate the 10 000 MNIST test digits after every
epoch; they stop at the first epoch whose test accuracy reaches ``--target`` (0.99). Only the
training is timed (the test evaluations are not, on either side):

* project: ``cnnvis.training.Trainer`` on the config, exactly as ``cnnvis train`` runs it (minus the
  progress bar and TensorBoard listeners; ``benchmarks/logging_overhead.py`` measures those).
  An epoch is timed from the trainer's epoch-start event to its epoch-end event, so the project's
  own per-epoch validation pass and checkpoint writes are inside the time; the start-up checkpoint
  that ``fit`` writes before the first epoch is in it too.
* baseline: pytorch/examples ``mnist/main.py`` as its authors wrote it: the same ``Net``
  (conv 32@3x3, conv 64@3x3, max-pool, dropout 0.25, fc 9216->128, dropout 0.5, fc 128->10,
  log_softmax, nll_loss), Adadelta lr 1.0, StepLR(step 1, gamma 0.7), batch 64, test batch 1000,
  seed 1, ``torchvision.datasets.MNIST`` with per-sample ``ToTensor`` + ``Normalize`` through a
  ``DataLoader`` with its defaults; ``num_workers=1, pin_memory=True, shuffle=True`` only on CUDA,
  as in the example (on the CPU the example does not shuffle: kept, ``--baseline-shuffle`` turns
  it on). Its ``loss.item()`` every 10 batches is kept; the log line is printed with ``--verbose``.
  An epoch is the example's ``train()`` call.

With ``--whole-process`` the project side is instead the ``cnnvis train`` command itself, run as a
subprocess with ``--set train.epochs=E`` for E = 1, 2, ... until its test accuracy (read from the
run's ``metrics.jsonl``) reaches the target: the wall clock of that whole process -- interpreter
and torch start-up, reading MNIST, training, validation, checkpoints, TensorBoard logging, the
test pass and the end-of-run pictures -- against the baseline's training time alone.

Setting up (reading MNIST, building the model) is not timed on either side and is shown apart.
Both sides are warmed up on throwaway models first; on CUDA the clocks are read after a
synchronize. The project is timed before and after the baseline (so drifting load from other
processes hits both) and its mean is used. The last line is the headline ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.optim as optim  # noqa: E402
from torch.optim.lr_scheduler import StepLR  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from cnnvis.config import data_root, load_config  # noqa: E402
from cnnvis.data import build_data  # noqa: E402
from cnnvis.data.mnist import _place_mnist_files  # noqa: E402
from cnnvis.training.loop import evaluate  # noqa: E402
from cnnvis.training.trainer import Listener, Trainer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------- the project


class Reached(Exception):
    """Raised from the epoch-end listener to stop ``Trainer.fit`` once the target is reached."""


class TestEachEpoch(Listener):
    """Times each epoch (start event to end event) and then, untimed, tests the current weights."""

    def __init__(self, target: float, max_epochs: int) -> None:
        self.target, self.max_epochs = target, max_epochs
        self.epoch_seconds: list[float] = []
        self.test_accuracy: list[float] = []
        self.fit_start = 0.0
        self.started = None

    def on_train_start(self, state) -> None:
        sync(state.device)
        self.started = time.perf_counter()  # the start-up checkpoint (before this event) is added apart

    def on_epoch_start(self, state) -> None:
        sync(state.device)
        self._t = time.perf_counter()

    def on_epoch_end(self, state, metrics) -> None:
        sync(state.device)
        self.epoch_seconds.append(time.perf_counter() - self._t)
        accuracy = evaluate(state.model, state.data.test, state.device)["accuracy"]  # not timed
        self.test_accuracy.append(accuracy)
        if accuracy >= self.target or len(self.test_accuracy) >= self.max_epochs:
            raise Reached


def project_run(config, device: torch.device, target: float, max_epochs: int) -> dict:
    t = time.perf_counter()
    data = build_data(config, device)
    with tempfile.TemporaryDirectory() as runs:
        sync(device)
        t_trainer = time.perf_counter()
        clock = TestEachEpoch(target, max_epochs)
        trainer = Trainer(config, runs_dir=runs, device=str(device), listeners=[clock], data=data)
        setup = time.perf_counter() - t
        sync(device)
        begin = time.perf_counter()
        try:
            trainer.fit()
        except Reached:
            pass
        finally:
            trainer.close()
        before_first_epoch = clock.started - begin
    return {
        "seconds": before_first_epoch + sum(clock.epoch_seconds),
        "epoch_seconds": clock.epoch_seconds,
        "test_accuracy": clock.test_accuracy,
        "setup": setup,
        "trainer_setup": clock.started - t_trainer,
    }


def project_warmup(config, device: torch.device) -> None:
    """A few training steps and an evaluation on a throwaway trainer (own data bundle, own run dir)."""
    steps = 8
    warm = config.model_copy(deep=True)
    warm.data.subset = warm.data.batch_size * steps
    with tempfile.TemporaryDirectory() as runs:
        trainer = Trainer(warm, runs_dir=runs, device=str(device))
        trainer.train_one_epoch()
        evaluate(trainer.state.model, trainer.data.val, device)
        sync(device)


# ----------------------------------------------------------------- the baseline (pytorch/examples mnist/main.py)


class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


def train(args, model, device, train_loader, optimizer, epoch):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % args.log_interval == 0:
            line = 'Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}'.format(
                epoch, batch_idx * len(data), len(train_loader.dataset),
                100. * batch_idx / len(train_loader), loss.item())
            if args.verbose:
                print(line)
            if args.dry_run:
                break


def test(model, device, test_loader):
    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction='sum').item()  # sum up batch loss
            pred = output.argmax(dim=1, keepdim=True)  # get the index of the max log-probability
            correct += pred.eq(target.view_as(pred)).sum().item()
    test_loss /= len(test_loader.dataset)
    return correct / len(test_loader.dataset)


def baseline_loaders(args, device: torch.device):
    train_kwargs = {'batch_size': args.batch_size}
    test_kwargs = {'batch_size': args.test_batch_size}
    if device.type == "cuda":
        cuda_kwargs = {'num_workers': 1,
                       'pin_memory': True,
                       'shuffle': True}
        train_kwargs.update(cuda_kwargs)
        test_kwargs.update(cuda_kwargs)
    if args.baseline_shuffle:
        train_kwargs['shuffle'] = True
    transform = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize((0.1307,), (0.3081,))
    ])
    dataset1 = datasets.MNIST(args.data_root, train=True, download=False, transform=transform)
    dataset2 = datasets.MNIST(args.data_root, train=False, transform=transform)
    train_loader = torch.utils.data.DataLoader(dataset1, **train_kwargs)
    test_loader = torch.utils.data.DataLoader(dataset2, **test_kwargs)
    return train_loader, test_loader


def baseline_warmup(args, device: torch.device, train_loader) -> None:
    model = Net().to(device)
    optimizer = optim.Adadelta(model.parameters(), lr=args.lr)
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        F.nll_loss(model(data), target).backward()
        optimizer.step()
        if batch_idx == 7:
            break
    sync(device)


def baseline_run(args, device: torch.device, target: float, max_epochs: int) -> dict:
    t = time.perf_counter()
    train_loader, test_loader = baseline_loaders(args, device)
    baseline_warmup(args, device, train_loader)
    torch.manual_seed(args.seed)  # the example seeds once, before building its loaders and model
    model = Net().to(device)
    optimizer = optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    setup = time.perf_counter() - t
    epoch_seconds, test_accuracy = [], []
    for epoch in range(1, max_epochs + 1):
        sync(device)
        start = time.perf_counter()
        train(args, model, device, train_loader, optimizer, epoch)
        sync(device)
        epoch_seconds.append(time.perf_counter() - start)
        test_accuracy.append(test(model, device, test_loader))  # not timed
        if args.verbose:
            print(f"baseline epoch {epoch}: {epoch_seconds[-1]:.1f} s, test accuracy {test_accuracy[-1]:.4f}", flush=True)
        scheduler.step()
        if test_accuracy[-1] >= target:
            break
    return {"seconds": sum(epoch_seconds), "epoch_seconds": epoch_seconds, "test_accuracy": test_accuracy, "setup": setup}


# ----------------------------------------------------------------- report


def reached(run: dict, target: float) -> bool:
    return bool(run["test_accuracy"]) and run["test_accuracy"][-1] >= target


def row(name: str, run: dict, target: float) -> str:
    accs = " ".join(f"{a * 100:.2f}" for a in run["test_accuracy"])
    epochs = len(run["test_accuracy"]) if reached(run, target) else f">{len(run['test_accuracy'])}"
    return (f"{name:<22} {epochs:>6} {run['seconds']:>10.1f} {statistics.mean(run['epoch_seconds']):>10.1f} "
            f"{run['setup']:>8.1f}  {accs}")


def whole_process_run(args: argparse.Namespace, max_epochs: int) -> dict:
    """``cnnvis train`` as a subprocess with 1, 2, ... epochs until the test accuracy reaches the target."""
    for epochs in range(1, max_epochs + 1):
        with tempfile.TemporaryDirectory() as runs:
            command = [sys.executable, "-m", "cnnvis", "train", str(args.config), "--runs-dir", runs,
                       "--device", args.device, "--set", f"train.epochs={epochs}"]
            for override in args.overrides:
                command += ["--set", override]
            env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "100"}
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600, check=False)
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                sys.exit(f"cnnvis train failed:\n{done.stderr[-2000:]}")
            (metrics,) = Path(runs).glob("*/metrics.jsonl")
            final = [json.loads(line) for line in metrics.read_text().splitlines() if "test_accuracy" in line][-1]
        print(f"  cnnvis train, {epochs} epoch(s): {seconds:.1f} s wall clock, test {final['test_accuracy']:.4f}", flush=True)
        if final["test_accuracy"] >= args.target:
            return {"seconds": seconds, "epochs": epochs, "test_accuracy": final["test_accuracy"]}
    return {"seconds": seconds, "epochs": max_epochs, "test_accuracy": final["test_accuracy"]}


def whole_process_main(args: argparse.Namespace, config: Any, device: torch.device, max_project: int) -> None:
    project = whole_process_run(args, max_project)
    if args.only == "project":
        print(f"whole `cnnvis train` process to {project['test_accuracy']:.2%} test accuracy: {project['seconds']:.1f} s "
              f"({project['epochs']} epoch(s); baseline not run)")
        return
    baseline = baseline_run(args, device, args.target, args.max_epochs_baseline)
    ok = project["test_accuracy"] >= args.target and reached(baseline, args.target)
    ratio = baseline["seconds"] / project["seconds"]
    print(f"baseline (pytorch/examples mnist, training time only): {baseline['seconds']:.1f} s, "
          f"test {baseline['test_accuracy']}")
    print(f"time to {args.target * 100:g}% test accuracy: whole cnnvis train process {project['seconds']:.1f} s "
          f"({project['epochs']} epoch(s)) vs baseline training {baseline['seconds']:.1f} s -> "
          f"{f'{ratio:.1f}x' if ok else f'undetermined ({ratio:.1f}x; a side missed the target)'} faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "mnist.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="project config override, e.g. data.batch_size=256")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--target", type=float, default=0.99, help="test accuracy to reach")
    parser.add_argument("--max-epochs-project", type=int, default=None, help="default: the config's train.epochs")
    parser.add_argument("--max-epochs-baseline", type=int, default=14, help="default: the example's 14 epochs")
    parser.add_argument("--only", choices=["project", "baseline"], default=None)
    parser.add_argument("--baseline-shuffle", action="store_true", help="shuffle the baseline's training set on the CPU too")
    parser.add_argument("--verbose", action="store_true", help="print the example's log lines and per-epoch results")
    parser.add_argument("--whole-process", action="store_true",
                        help="project side: the whole `cnnvis train` process, as a user runs it")
    args = parser.parse_args()
    # The example's own arguments, at its defaults.
    args.batch_size, args.test_batch_size, args.lr, args.gamma = 64, 1000, 1.0, 0.7
    args.seed, args.log_interval, args.dry_run = 1, 10, False

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    overrides = list(args.overrides)
    config = load_config(args.config, overrides)
    # The same placed files the project reads (decompressed once; the example would download them).
    args.data_root = str(_place_mnist_files(data_root(config.data), download=False))
    max_project = args.max_epochs_project or config.train.epochs

    cpu = (os.popen("lscpu | sed -n 's/^Model name: *//p'").read().strip() or "?") if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"device {device} ({cpu}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    runs: dict[str, dict] = {}
    if args.whole_process:
        return whole_process_main(args, config, device, max_project)
    if args.only != "baseline":
        project_warmup(config, device)
        runs["project (run 1)"] = project_run(config, device, args.target, max_project)
        print(f"  project run 1: {runs['project (run 1)']['seconds']:.1f} s, test {runs['project (run 1)']['test_accuracy']}", flush=True)
    if args.only != "project":
        runs["baseline"] = baseline_run(args, device, args.target, args.max_epochs_baseline)
        print(f"  baseline: {runs['baseline']['seconds']:.1f} s, test {runs['baseline']['test_accuracy']}", flush=True)
    if args.only != "baseline":
        runs["project (run 2)"] = project_run(config, device, args.target, max_project)
        print(f"  project run 2: {runs['project (run 2)']['seconds']:.1f} s, test {runs['project (run 2)']['test_accuracy']}", flush=True)

    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; target: {args.target * 100:.1f}% test accuracy")
    print(f"{'side':<22} {'epochs':>6} {'train s':>10} {'s/epoch':>10} {'setup s':>8}  test accuracy % after each epoch")
    for name, run in runs.items():
        print(row(name, run, args.target))
    projects = [r for n, r in runs.items() if n.startswith("project")]
    if not projects or "baseline" not in runs:
        return
    project_s = statistics.mean(r["seconds"] for r in projects)
    baseline_s = runs["baseline"]["seconds"]
    ok_p, ok_b = all(reached(r, args.target) for r in projects), reached(runs["baseline"], args.target)
    ratio = baseline_s / project_s
    if ok_p and ok_b:
        verdict = f"{ratio:.1f}x"
    elif ok_p:
        verdict = f"more than {ratio:.1f}x (the baseline did not reach the target in {args.max_epochs_baseline} epochs)"
    elif ok_b:
        verdict = f"less than {ratio:.1f}x (the project did not reach the target in {max_project} epochs)"
    else:
        verdict = f"undetermined (neither side reached the target; time ratio {ratio:.1f}x)"
    print(f"time to {args.target * 100:g}% test accuracy: project {project_s:.1f} s (mean of {len(projects)}) vs "
          f"baseline {baseline_s:.1f} s -> project is {verdict} faster")


if __name__ == "__main__":
    main()
