"""Shared pieces of the benchmarks: environment record, alternating timer, peak memory, tables, result records.

Not part of the metaxfer package: the benchmarks import the peer libraries,
which live only in ``.venv-bench`` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


# --- environment ---------------------------------------------------------------------------------


def learn2learn_maml_step(model: nn.Module, batch: Any, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                          inner_lr: float, inner_steps: int, lr: float) -> Callable[[], float]:
    """One second-order learn2learn 0.2.0 MAML meta-iteration as its examples write it; returns the mean query loss.

    Per task: ``clone()``, ``inner_steps`` calls of ``adapt(loss on the support)``, the query loss
    ``backward()``; then the gradients are scaled by 1 / tasks and Adam steps. ``batch`` is a
    batched :class:`metaxfer.tasks.Episode` (``[T, ...]`` tensors).
    """
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), lr)
    sx, sy, qx, qy = batch.support_x, batch.support_y, batch.query_x, batch.query_y
    tasks = batch.num_tasks

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for t in range(tasks):
            learner = maml.clone()
            for _ in range(inner_steps):
                learner.adapt(loss_fn(learner(sx[t]), sy[t]))
            loss = loss_fn(learner(qx[t]), qy[t])
            loss.backward()
            total += loss.item()
        for p in maml.parameters():
            p.grad.mul_(1.0 / tasks)
        opt.step()
        return total / tasks

    return step


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> dict[str, Any]:
    def run(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = run("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}
    try:
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        dirty = None
    return {"commit": sha, "dirty": dirty}


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def commit() -> str:
    """Current git commit, with -dirty when tracked files have changes."""
    info = git_commit()
    return f"{info['commit'][:7]}{'-dirty' if info['dirty'] else ''}"


def machine() -> str:
    """CPU model, torch threads and platform of this machine."""
    return f"{cpu_model()}, {torch.get_num_threads()} torch threads, {platform.system()} {platform.machine()}"


def environment(packages: Sequence[str]) -> dict[str, Any]:
    """What the numbers depend on: versions, threads, CPU, load, allocator, date, commit."""
    from metaxfer.runtime import allocator_settings

    alloc = allocator_settings()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "packages": package_versions(packages),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "allocator": alloc.as_dict() if alloc is not None else None,
        "env": {
            k: os.environ[k]
            for k in sorted(os.environ)
            if k.startswith(("OMP_", "MKL_", "GOMP_", "KMP_", "MALLOC_", "GLIBC_TUNABLES", "OPENBLAS_", "METAXFER_"))
        },
    }


# --- timing --------------------------------------------------------------------------------------


def alternate(steps: Mapping[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Run every step ``warmup`` times, then ``rounds`` rounds of one call each, alternating.

    Within a round the order is reversed every other round (A B, B A, ...), so
    neither variant always runs right after the other; all variants see the
    same machine load over the run.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def summary(samples: Sequence[float]) -> dict[str, float]:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"median": statistics.median(s), "min": s[0], "p25": q[0], "p75": q[2], "n": len(s)}


def paired_difference(
    a: Sequence[float], b: Sequence[float], wins: str = "wins", losses: str = "losses"
) -> dict[str, Any]:
    """Mean ± 95% CI (1.96·s/√n) of the per-episode differences a − b, with how often a is above, equal, below.

    ``a`` and ``b`` are scores of the same episodes (equal lengths); ``wins`` / ``losses`` name the
    counts of a > b and a < b in the result (keys: mean, ci95, std, n, wins, ties, losses).
    """
    from metaxfer.evaluate import mean_ci95

    d = [x - y for x, y in zip(a, b, strict=True)]
    mean, ci, std = mean_ci95(d)
    return {"mean": mean, "ci95": ci, "std": std, "n": len(d), wins: sum(x > 0 for x in d),
            "ties": sum(x == 0 for x in d), losses: sum(x < 0 for x in d)}


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num[r] / den[r]: robust to load that changes between rounds."""
    return statistics.median(a / b for a, b in zip(num, den))


class GemmProbe:
    """Times float32 GEMMs between benchmark steps, for a FLOP lower bound under the same load.

    Two kernels, because they differ a lot on some CPUs: ``torch.mm`` (MKL's
    sgemm, which on AMD processors does not use its AVX-512 code) and a 1x1
    convolution in channels-last layout (a GEMM run by oneDNN, the library
    that also runs the convolutions being bounded). The bound uses the faster.
    """

    def __init__(self, n: int = 1536, conv: tuple[int, int, int] = (16, 1024, 16)) -> None:
        self.a, self.b = torch.randn(n, n), torch.randn(n, n)
        self.mm_flop = 2.0 * n**3
        batch, channels, side = conv
        self.x = torch.randn(batch, channels, side, side).contiguous(memory_format=torch.channels_last)
        self.w = torch.randn(channels, channels, 1, 1)
        self.conv_flop = 2.0 * batch * side * side * channels * channels
        self.shapes = {"mkl_mm": [n, n, n], "onednn_conv1x1": [batch, channels, side, side]}

    def steps(self) -> dict[str, Callable[[], Any]]:
        return {
            "gemm:mkl_mm": lambda: torch.mm(self.a, self.b),
            "gemm:onednn_conv1x1": lambda: torch.nn.functional.conv2d(self.x, self.w),
        }

    def rates(self, times: dict[str, list[float]]) -> dict[str, Any]:
        """Pops the probe's timings from ``times``; GFLOP/s per kernel (median and max over rounds)."""
        out: dict[str, Any] = {"shapes": self.shapes}
        for key, flop in (("mkl_mm", self.mm_flop), ("onednn_conv1x1", self.conv_flop)):
            r = [flop / t / 1e9 for t in times.pop("gemm:" + key)]
            out[key] = {"median_gflops": statistics.median(r), "max_gflops": max(r)}
        best = max(("mkl_mm", "onednn_conv1x1"), key=lambda k: out[k]["median_gflops"])
        out["bound_kernel"] = best
        out["bound_gflops"] = out[best]["median_gflops"]
        return out


# --- FLOPs ---------------------------------------------------------------------------------------


def conv_linear_flops(module: nn.Module, run: Callable[[], Any]) -> dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of every Conv2d / Linear call while ``run()`` executes.

    Forward: ``2 * outputs * fan_in``. Backward: the weight gradient costs the
    same again, and the input gradient too when the layer's input requires
    grad (not for the first layer, whose input is data). Bias, BatchNorm,
    pooling and element-wise work are left out: the result is a lower bound.
    """
    totals = {"forward": 0.0, "backward": 0.0}

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            fan_in = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            fan_in = mod.in_features
        f = 2.0 * output.numel() * fan_in
        totals["forward"] += f
        totals["backward"] += f * (2 if inputs[0].requires_grad else 1)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    totals["total"] = totals["forward"] + totals["backward"]
    return totals


# --- memory --------------------------------------------------------------------------------------


def rss_mb() -> float:
    """Current resident set size (MB)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB).

    Reads VmHWM, the high-water mark of this process's own address space: on
    Linux ``getrusage``'s ``ru_maxrss`` survives ``exec``, so in a subprocess it
    would report the parent's peak when that is larger.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def measure_in_subprocess(script: Path, variant: str, extra: Sequence[str]) -> dict[str, Any]:
    """Run ``script --child-memory VARIANT`` in a fresh interpreter; it prints one JSON line."""
    cmd = [sys.executable, str(script), "--child-memory", variant, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- output --------------------------------------------------------------------------------------


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths)), line]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells[1:]]
    return "\n".join(out)


def emit(record: dict[str, Any], human: str, out: str | None) -> None:
    """Print the human table, then the JSON record as the last line; also write it to ``out``."""
    if hasattr(os, "getloadavg"):
        record.setdefault("environment", {})["loadavg_end"] = list(os.getloadavg())
    print(human)
    print(json.dumps(record, sort_keys=False))
    if out:
        write_json(record, out)


def write_json(record: dict[str, Any], out: str | Path) -> None:
    """``record`` as indented JSON in ``out`` (its folder created when missing)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=2) + "\n")


def stamp(record: dict[str, Any]) -> dict[str, Any]:
    """Add commit, machine, torch version and today's date to ``record`` (in place, at the end); returns it."""
    record.update(commit=commit(), machine=machine(), torch=torch.__version__, date=dt.date.today().isoformat())
    return record


def write_record(record: dict[str, Any], out: str | Path) -> None:
    """:func:`stamp` ``record``, then write it to ``out`` as indented JSON."""
    write_json(stamp(record), out)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


# --- the paper's Conv4, written plainly (what a peer library's user would build) -----------------


class PlainAffine(nn.Module):
    """Per-channel ``x * weight + bias`` (the parameters of metaxfer's ChannelAffine)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class PlainConv4(nn.Module):
    """Four blocks of 3x3 conv (``hidden`` channels) -> BatchNorm -> ReLU -> 2x2 max-pool, NCHW, stock modules.

    The same architecture and ``state_dict`` keys as ``metaxfer.backbones.Conv4``
    (``norm="batchnorm"``, ``"batchnorm_split"`` or ``"none"``, ``downsample="maxpool"``),
    in the paper's layer order and without metaxfer's CPU fast paths.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, num_classes: int | None = None, norm: str = "batchnorm", image_size: int = 28) -> None:
        super().__init__()
        blocks = []
        for i in range(4):
            layers: list[nn.Module] = [nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1)]
            if norm == "batchnorm":
                layers.append(nn.BatchNorm2d(hidden))
            elif norm == "batchnorm_split":
                layers += [nn.BatchNorm2d(hidden, affine=False), PlainAffine(hidden)]
            elif norm != "none":
                raise ValueError(norm)
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            blocks.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*blocks)
        side = image_size // 16
        self.head = nn.Linear(hidden * side * side, num_classes) if num_classes is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x).flatten(1)
        return self.head(z) if self.head is not None else z


def split_to_affine_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a ``norm="batchnorm_split"`` Conv4 state_dict onto ``norm="batchnorm"`` keys (same function)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and parts[2] == "2":  # ChannelAffine -> BatchNorm affine
            out[".".join([parts[0], parts[1], "1", parts[3]])] = value
        else:
            out[key] = value
    return out
