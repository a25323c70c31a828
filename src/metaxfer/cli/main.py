"""``metaxfer train | eval | configs | models``: parse -> build from config -> train / evaluate."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from metaxfer.errors import ConfigError, MetaxferError


def _protocol(data_cfg: Any, split: str) -> str:
    protocol = data_cfg.args.get("protocol")
    return " ".join(str(p) for p in (data_cfg.dataset, protocol, split) if p)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a preset (with overrides), then evaluate the best checkpoint on the fixed test episodes.

    The same command runs data-parallel under ``torchrun --nproc_per_node N -m metaxfer train ...``
    (see ``docs/distributed.md``): every rank trains on its share of each meta-batch and of the test
    episodes; only rank 0 prints and writes files.
    """
    from metaxfer.train import distributed

    try:
        return _train_and_test(args)
    finally:
        distributed.teardown()


RUN_CONFIG_FILE = "run_config.json"


def _run_config(args: argparse.Namespace) -> tuple[Any, Path]:
    """The configuration and run directory of ``metaxfer train``.

    With ``--config`` the preset (plus overrides) is the configuration. Without it, ``--run-dir`` must
    hold a previous run: its saved ``run_config.json`` (plus overrides) is the configuration, so a run is
    extended with exactly the settings it was trained with, e.g. ``metaxfer train --run-dir D train.steps=N``.

    Raises:
        ConfigError: neither ``--config`` nor a run directory with a saved configuration was given.
    """
    from metaxfer.config import apply_overrides, config_from_dict, load_config

    if args.config:
        cfg = load_config(args.config, args.overrides)
        return cfg, Path(args.run_dir or cfg.run_dir or Path("runs") / cfg.name)
    if not args.run_dir:
        raise ConfigError("give --config (a preset, see `metaxfer configs`, or a YAML file), or --run-dir of an "
                          "earlier run to continue it with its saved configuration")
    saved = Path(args.run_dir) / RUN_CONFIG_FILE
    if not saved.is_file():
        raise ConfigError(f"{saved} does not exist, so there is no saved configuration to continue; give --config "
                          "(a preset, see `metaxfer configs`, or a YAML file) to start a run there")
    try:
        data = json.loads(saved.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{saved} is not valid JSON ({e}); give --config to start afresh") from None
    return config_from_dict(apply_overrides(data, list(args.overrides))), Path(args.run_dir)


def _config_changes(old: Any, new: Any, where: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two nested config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new))
                for c in _config_changes(old.get(k), new.get(k), f"{where}.{k}" if where else k)]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def _warn_if_config_changed(run_dir: Path, cfg: Any) -> None:
    """Say which settings differ when ``--config`` resumes a run saved with other ones.

    A preset's defaults silently replacing a run's overrides (say its meta-batch size) would change
    the run being extended; the warning names each difference and the command that keeps them.
    """
    saved = run_dir / RUN_CONFIG_FILE
    if not saved.is_file() or not (run_dir / "checkpoints").is_dir():
        return
    try:
        before = json.loads(saved.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return
    changes = [c for c in _config_changes(before, cfg.to_dict()) if not c.startswith("run_dir:")]
    if changes:
        print(f"metaxfer train: warning: resuming {run_dir} with settings that differ from its saved "
              f"{RUN_CONFIG_FILE}: {'; '.join(changes)}. To continue with the saved ones, leave out --config: "
              f"metaxfer train --run-dir {run_dir} [section.key=value ...]", file=sys.stderr, flush=True)


def _train_and_test(args: argparse.Namespace) -> int:
    import os

    import torch

    from metaxfer.atomic import atomic_write_json
    from metaxfer.build import (
        build_learner,
        build_optimizer,
        build_sampler,
        build_scheduler,
        check_device,
    )
    from metaxfer.evaluate import evaluate
    from metaxfer.hub import WEIGHTS_FILE, load, load_weights, resolve
    from metaxfer.runtime import freeze_gc, tune_allocator
    from metaxfer.train import distributed, fit

    tune_allocator()
    cfg, run_dir = _run_config(args)
    if cfg.train.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {cfg.train.steps}: a run needs a trained checkpoint to test")
    if cfg.eval.episodes < 1 and not args.no_test:
        raise ConfigError(f"eval.episodes must be >= 1, got {cfg.eval.episodes} (or pass --no-test)")
    device = distributed.setup(check_device(cfg.device))  # joins the process group under torchrun (cuda -> cuda:LOCAL_RANK)
    main = distributed.is_main()
    if main and args.config and not args.restart:
        _warn_if_config_changed(run_dir, cfg)
    t, e = cfg.train, cfg.eval
    torch.manual_seed(t.seed)
    # A class dataset is wrapped in an EpisodeSampler; a task distribution (sinusoid) samples its own episodes;
    # train.sampler: classes draws supervised batches over all classes (baseline / baseline_pp pretraining).
    sampler = build_sampler(cfg.data, cfg.data.train_split, t.ways, t.shots, t.queries, t.seed,
                            sampler=t.sampler, batch_size=t.batch_size)
    train_set = sampler.dataset
    val_episodes = None
    if cfg.data.val_split and t.val_episodes > 0:
        val_sampler = build_sampler(cfg.data, cfg.data.val_split, e.ways, e.shots, e.queries, e.seed)
        val_episodes = val_sampler.fixed_episodes(t.val_episodes, seed=e.seed + 1)
    preprocess = train_set.preprocess.to_dict() if hasattr(train_set, "preprocess") else None
    learner = build_learner(cfg.model, preprocess=preprocess)
    if args.init:
        # Warm start (e.g. a second phase at a lower learning rate): weights only, fresh optimiser.
        # A resumable checkpoint of this run directory still takes precedence in fit().
        load_weights(learner, resolve(args.init) / WEIGHTS_FILE)
    if distributed.world_size() > 1:
        # Same weights on every rank (fit broadcasts rank 0's anyway); from here on each rank draws its own
        # random numbers (dropout), seed offset by rank. The episodes come from the sampler's own generator.
        torch.manual_seed(t.seed + distributed.rank())
    optimizer = build_optimizer(learner.parameters(), t)
    scheduler = build_scheduler(optimizer, t)
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        atomic_write_json(run_dir / RUN_CONFIG_FILE, cfg.to_dict())
    freeze_gc()  # the model, data and optimiser live for the whole run: keep them out of GC passes
    command = ("metaxfer train " + (f"--config {args.config}" if args.config else f"--run-dir {run_dir}")
               + (f" --init {args.init}" if args.init else "") + "".join(f" {o}" for o in args.overrides))
    extra = {"run_config": cfg.to_dict(), "command": command, "processes": distributed.world_size(),
             "data": train_set.describe() if hasattr(train_set, "describe") else None}
    # A worker restarted by torchrun (--max-restarts) continues from the checkpoints even with --restart:
    # the first attempt already cleared the old ones.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    result = fit(learner, sampler, optimizer, t.steps, t.tasks_per_step, scheduler=scheduler,
                 val_episodes=val_episodes, val_every=t.val_every, run_dir=run_dir,
                 checkpoint_every=t.checkpoint_every, resume=not args.restart or restarted, grad_clip=t.grad_clip,
                 on_nonfinite=t.on_nonfinite, device=device, progress=args.progress, extra_config=extra,
                 tasks_per_backward=t.tasks_per_backward)
    if main:
        print(f"trained {result.steps} steps in {result.seconds:.0f} s; run directory: {run_dir}", flush=True)
    if args.no_test or not cfg.data.test_split:
        return 0
    best = load(run_dir, device=device)
    test_sampler = build_sampler(cfg.data, cfg.data.test_split, e.ways, e.shots, e.queries, e.seed)
    episodes = test_sampler.fixed_episodes(e.episodes, seed=e.seed)
    res = evaluate(best, episodes, protocol=_protocol(cfg.data, cfg.data.test_split), distributed=True)
    if main:
        # checkpoint_step: the step of the tested (best-on-validation) checkpoint, a number.
        atomic_write_json(run_dir / "test_result.json", {**res.to_dict(), "checkpoint_step": best.card.get("trained_steps"),
                                                         "command": command})
        print(res.line(), flush=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint or zoo model on fixed test episodes of the data it was trained on."""
    from torch import nn

    from metaxfer.build import build_sampler, check_device
    from metaxfer.config import RunConfig, config_from_dict
    from metaxfer.evaluate import evaluate
    from metaxfer.hub import load
    from metaxfer.runtime import tune_allocator

    tune_allocator()
    check_device(args.device)
    if args.episodes is not None and args.episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {args.episodes}")
    learner = load(args.checkpoint, device=args.device)
    if args.inner_steps is not None:
        if not hasattr(learner, "eval_inner_steps"):
            raise ConfigError(f"--inner-steps applies to gradient-based learners; {type(learner).__name__} has no inner loop")
        if args.inner_steps < 0:
            raise ConfigError(f"--inner-steps must be >= 0, got {args.inner_steps}")
        learner.eval_inner_steps = args.inner_steps
    if args.query_batches != "all" and not args.transductive:
        raise ConfigError("--query-batches one-per-class changes only transductive predictions (each batch's "
                          "BatchNorm statistics normalise its queries); add --transductive or drop it")
    if args.transductive:
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in learner.modules()):
            raise ConfigError(f"--transductive changes how BatchNorm normalises queries, and {args.checkpoint} has no "
                              "BatchNorm layer: its result would be the plain one; drop --transductive")
        learner.set_transductive(True)
    run_cfg = learner.card.get("run_config")
    # The data and episode sizes the model was trained and tested with, unless overridden.
    cfg = config_from_dict(run_cfg) if run_cfg else RunConfig()
    data_cfg = cfg.data
    if args.data_root:
        data_cfg.root = args.data_root
    split = args.split or data_cfg.test_split
    # `is None`, not `or`: an explicit --ways 0 must reach the sampler's check, not become the default.
    ways = cfg.eval.ways if args.ways is None else args.ways
    shots = cfg.eval.shots if args.shots is None else args.shots
    queries = cfg.eval.queries if args.queries is None else args.queries
    n = cfg.eval.episodes if args.episodes is None else args.episodes
    seed = cfg.eval.seed if args.seed is None else args.seed
    sampler = build_sampler(data_cfg, split, ways, shots, queries, seed)
    episodes = sampler.fixed_episodes(n, seed=seed)
    res = evaluate(learner, episodes, protocol=_protocol(data_cfg, split), device=args.device, progress=args.progress,
                   query_batches=args.query_batches.replace("-", "_"))
    if args.json:
        print(json.dumps({**res.to_dict(), "checkpoint": str(args.checkpoint)}, indent=2))
    else:
        print(res.line())
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    """List the packaged presets, or print one."""
    from metaxfer.config import list_presets, load_config

    if args.show:
        print(yaml.safe_dump(load_config(args.show).to_dict(), sort_keys=False), end="")
        return 0
    for name in list_presets():
        print(f"{name:32s} {load_config(name).description}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the packaged pretrained models with their recorded test accuracy."""
    from metaxfer.hub import list_zoo, read_config, zoo_root

    for name in list_zoo():
        card = read_config(zoo_root() / name).get("card", {})
        print(f"{name:32s} {card.get('accuracy', '')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``metaxfer`` command."""
    parser = argparse.ArgumentParser(prog="metaxfer", description="Few-shot learning: train, evaluate and list presets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (validation results, resumes)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a preset: metaxfer train --config omniglot/protonet_5w1s [train.steps=100 ...]")
    p.add_argument("--config", help="preset name (see `metaxfer configs`) or YAML path; without it, --run-dir "
                   "names an earlier run, continued with its saved run_config.json")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100 data.root=/data")
    p.add_argument("--run-dir", help="where checkpoints and metrics go (default: runs/<name>)")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in the run directory")
    p.add_argument("--init", metavar="CHECKPOINT", help="start from these weights (run or model directory, or zoo name); "
                   "the optimiser starts fresh")
    p.add_argument("--no-test", action="store_true", help="skip the final test evaluation")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a terminal)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint or zoo model on fixed test episodes")
    p.add_argument("--checkpoint", required=True, help="run or model directory, or a zoo name (see `metaxfer models`)")
    p.add_argument("--ways", type=int, help="classes per episode (default: the model's eval config)")
    p.add_argument("--shots", type=int, help="support examples per class (default: the model's eval config)")
    p.add_argument("--queries", type=int, help="query examples per class (default: the model's eval config)")
    p.add_argument("--episodes", type=int, help="number of fixed episodes (default: the model's eval config, 600 "
                   "for the presets)")
    p.add_argument("--seed", type=int, help="seed of the fixed episodes (default: the model's eval config, 0)")
    p.add_argument("--split", help="dataset split (default: the model's test split)")
    p.add_argument("--data-root", help="dataset folder (default: $METAXFER_DATA/<dataset>)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the full result record as JSON")
    p.add_argument("--progress", action="store_true", help="progress bar")
    p.add_argument("--inner-steps", type=int, help="test-time inner steps of a gradient-based learner (default: its own)")
    p.add_argument("--transductive", action="store_true", help="normalise each episode's queries with their own "
                   "BatchNorm batch statistics, the papers' transduction protocol (gradient-based learners, "
                   "Relation Networks; default: non-transductive)")
    p.add_argument("--query-batches", choices=("all", "one-per-class"), default="all",
                   help="with --transductive: predict the queries at once (all, the default) or in batches of one "
                   "query per class (one-per-class: the test batches of the reference MAML and Reptile code)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("configs", help="list packaged presets")
    p.add_argument("--show", metavar="NAME", help="print one preset in full")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("models", help="list packaged pretrained models")
    p.set_defaults(func=cmd_models)

    from metaxfer.cli.predict import add_predict_parser

    add_predict_parser(sub)  # metaxfer predict --model --support --query [--out]
    from metaxfer.cli.finetune import add_finetune_parser

    add_finetune_parser(sub)  # metaxfer finetune --model --train [--val] [--test] --out [--mode ...]
    from metaxfer.cli.distill import add_distill_parser

    add_distill_parser(sub)  # metaxfer distill --config --teacher [--run-dir] [key=value ...]
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, with a one-line message)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse collects positional overrides only in one run: `train.steps=2 --run-dir r train.lr=0.01` leaves
    # the second group over. Take such key=value leftovers as overrides too; anything else is still an error.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except MetaxferError as e:
        print(f"metaxfer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
