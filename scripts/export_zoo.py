"""Package a trained run into the model zoo (src/metaxfer/zoo/NAME/) with a model card.

    python scripts/export_zoo.py --run-dir runs/protonet_5w1s --name protonet-omniglot-5w1s \
        --result benchmarks/results/protonet_5w1s.json --ways 5 --shots 1

Copies the run's best checkpoint (weights + config) and adds a ``card`` to config.json
(training command, commit, data protocol, test accuracy ± 95% CI from the benchmark record)
plus a human-readable MODEL_CARD.md. The eval defaults stored in the card's run config are
set to the given ways/shots, so `metaxfer eval --checkpoint NAME` reproduces the card's figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from metaxfer.atomic import atomic_write_json, atomic_write_text
from metaxfer.hub import CONFIG_FILE, WEIGHTS_FILE, resolve

ZOO = Path(__file__).resolve().parents[1] / "src" / "metaxfer" / "zoo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--result", required=True, help="JSON written by benchmarks/omniglot_accuracy.py")
    parser.add_argument("--ways", type=int, required=True)
    parser.add_argument("--shots", type=int, required=True)
    parser.add_argument("--note", default="", help="extra training history for the card (e.g. an earlier phase)")
    args = parser.parse_args()

    source = resolve(args.run_dir)
    record = json.loads(Path(args.result).read_text())
    match = [r for r in record["results"] if r["ways"] == args.ways and r["shots"] == args.shots]
    if not match:
        raise SystemExit(f"{args.result} has no {args.ways}-way {args.shots}-shot result")
    res = match[0]
    config = json.loads((source / CONFIG_FILE).read_text())
    config["run_config"]["eval"].update(ways=args.ways, shots=args.shots)
    accuracy = f"{res['mean']:.2f} ± {res['ci95']:.2f} % (95% CI, {res['n']} episodes, {res['protocol']}, {args.ways}-way {args.shots}-shot)"
    config["card"] = {
        "name": args.name,
        "accuracy": accuracy,
        "result": res,
        "train_command": record["train_command"],
        "checkpoint_step": record["checkpoint_step"],
        "commit": record["commit"],
        "machine": record["machine"],
        "date": record["date"],
        "data": config.get("data"),
        **({"note": args.note} if args.note else {}),
    }
    target = ZOO / args.name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copyfile(source / WEIGHTS_FILE, target / WEIGHTS_FILE)
    atomic_write_json(target / CONFIG_FILE, config)
    data = config.get("data") or {}
    atomic_write_text(target / "MODEL_CARD.md", f"""# {args.name}

- Learner: {config['model']['learner']} with {config['model']['backbone']} {json.dumps(config['model']['backbone_args'])}
- Data: {data.get('dataset', '?')} protocol {data.get('protocol', '?')}, trained on split {data.get('split', '?')}
  ({data.get('classes', '?')} classes); images {json.dumps(config.get('preprocess'))}
- Test accuracy: {accuracy}; episodes fingerprint {res.get('fingerprint')}, seed {res.get('seed')}
- Training command: `{record['train_command']}` (best validation checkpoint: step {record['checkpoint_step']})
{f"- {args.note}" + chr(10) if args.note else ""}- Commit {record['commit']}, {record['machine']}, {record['date']}
- Reproduce the figure: `metaxfer eval --checkpoint {args.name} --ways {args.ways} --shots {args.shots} --episodes {res['n']}`
""")
    print(f"exported {target}")


if __name__ == "__main__":
    main()
