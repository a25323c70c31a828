"""Meta-training throughput on 1 vs 2 processes (torchrun, gloo on CPU) for ProtoNet and MAML.

Usage:

    .venv/bin/python benchmarks/distributed_throughput.py --steps 20

For each learner and each layout it launches ``torchrun --standalone --nproc_per_node P`` on this
script in worker mode, which trains with :func:`metaxfer.fit` (the code path of
``metaxfer train``: every rank draws the whole meta-batch, runs its share of the tasks, and the
meta-gradient is all-reduced) and times the steps after ``--warmup`` from the per-step records.
Layouts (threads = ``OMP_NUM_THREADS`` per process):

* 1 process x 1 thread (the baseline),
* 1 process x 2 threads (intra-op parallelism on the same 2 cores),
* 2 processes x 1 thread (data parallel: each rank runs half of the meta-batch).

Workloads (Omniglot-sized synthetic 1x28x28 clusters, Conv4-64, 5-way 1-shot 15-query,
``tasks_per_step`` 8, Adam): ProtoNet and second-order MAML (1 inner step, the preset's
``omniglot/maml_5w1s`` model). In the 2-process runs the worker also times the meta-gradient
all-reduce alone (``all_reduce_grads`` on the learner's gradients, 20 repetitions).

Writes ``benchmarks/results/distributed_throughput.json`` (command, commit, machine, date, every
run's meta-iterations/s and tasks/s) and prints a table. Numbers depend on the load of the
machine; the record keeps the load average at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import torch

LEARNERS: dict[str, dict[str, Any]] = {
    "protonet": {"learner": "protonet", "backbone": "conv4", "backbone_args": {"in_channels": 1, "hidden": 64}},
    "maml": {"learner": "maml", "backbone": "conv4",
             "learner_args": {"inner_lr": 0.4, "inner_steps": 1, "first_order": False},
             "backbone_args": {"in_channels": 1, "hidden": 64, "num_classes": 5, "norm": "batchnorm_split"}},
}
LAYOUTS = [(1, 1), (1, 2), (2, 1)]  # (processes, threads per process)


def worker(args: argparse.Namespace) -> None:
    """One rank of a torchrun job: train ``args.learner`` for warmup + steps steps and time them."""
    import metaxfer
    from metaxfer.data.synthetic import ClusterImages
    from metaxfer.runtime import freeze_gc, tune_allocator
    from metaxfer.tasks import EpisodeSampler
    from metaxfer.train import distributed, fit

    tune_allocator()
    distributed.setup("cpu")
    torch.manual_seed(0)
    learner = metaxfer.build_learner(LEARNERS[args.learner])
    sampler = EpisodeSampler(ClusterImages("train", num_classes=40, per_class=20, image_size=28), 5, 1, 15, seed=0)
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    freeze_gc()
    total = args.warmup + args.steps
    result = fit(learner, sampler, opt, total, args.tasks, log_every=1, progress=False)
    seconds = {r["step"]: r["seconds"] for r in result.history}
    elapsed = seconds[total] - seconds[args.warmup]
    record: dict[str, Any] = {"seconds": elapsed, "steps": args.steps, "tasks_per_step": args.tasks,
                              "meta_iterations_per_s": args.steps / elapsed,
                              "tasks_per_s": args.steps * args.tasks / elapsed,
                              "params": sum(p.numel() for p in learner.parameters())}
    if distributed.world_size() > 1:
        distributed.barrier()
        reps, t0 = 20, time.perf_counter()
        for _ in range(reps):
            distributed.all_reduce_grads(learner.parameters(), 0.5)
        record["all_reduce_ms"] = 1000 * (time.perf_counter() - t0) / reps
    if distributed.is_main():
        Path(args.out).write_text(json.dumps(record))
    distributed.teardown()


def launch(learner: str, procs: int, threads: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{learner}_{procs}x{threads}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           str(Path(__file__).resolve()), "--worker", "--learner", learner, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--tasks", str(args.tasks), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{learner} {procs}x{threads} failed:\n{proc.stderr[-3000:]}")
    return {"learner": learner, "processes": procs, "threads_per_process": threads, **json.loads(out.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed meta-iterations per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first meta-iterations")
    parser.add_argument("--tasks", type=int, default=8, help="tasks_per_step (a multiple of 2)")
    parser.add_argument("--learners", default="protonet,maml")
    parser.add_argument("--out", default=str(C.REPO / "benchmarks" / "results" / "distributed_throughput.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--learner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    env = C.environment(["torch"])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for learner in args.learners.split(","):
            for procs, threads in LAYOUTS:
                run = launch(learner, procs, threads, args, Path(tmp))
                print(f"{learner:9s} {procs} proc x {threads} thread: {run['meta_iterations_per_s']:.3f} it/s, "
                      f"{run['tasks_per_s']:.2f} tasks/s", flush=True)
                runs.append(run)
    base = {r["learner"]: r["meta_iterations_per_s"] for r in runs if (r["processes"], r["threads_per_process"]) == (1, 1)}
    for r in runs:
        r["speedup_vs_1x1"] = round(r["meta_iterations_per_s"] / base[r["learner"]], 3)
    record = {
        "benchmark": "meta-training throughput, 1 vs 2 processes (torchrun, gloo, CPU)",
        "workload": {"episodes": "5-way 1-shot 15-query, 1x28x28 synthetic clusters", "backbone": "conv4-64",
                     "tasks_per_step": args.tasks, "optimizer": "adam", "steps_timed": args.steps,
                     "warmup_steps": args.warmup, "models": LEARNERS},
        "runs": runs,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        **{k: env[k] for k in ("commit", "dirty", "date")},
        "machine": {k: env[k] for k in ("cpu_model", "cpu_count", "cpu_affinity", "platform", "torch", "python",
                                        "loadavg_start")},
        "note": "shared machine: another training job (2 threads) ran throughout; numbers are indicative",
    }
    rows = [[r["learner"], f"{r['processes']} x {r['threads_per_process']}", f"{r['meta_iterations_per_s']:.3f}",
             f"{r['tasks_per_s']:.2f}", f"{r['speedup_vs_1x1']:.2f}", f"{r.get('all_reduce_ms', 0):.2f}"] for r in runs]
    human = C.table(rows, ["learner", "procs x threads", "meta-it/s", "tasks/s", "speedup", "all-reduce ms"])
    C.emit(record, human, args.out)


if __name__ == "__main__":
    main()
