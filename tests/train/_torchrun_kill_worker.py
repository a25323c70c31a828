"""``metaxfer`` under torchrun, with rank 1 killed once at step ``$KILL_AT_STEP`` (test helper, not a test).

``tests/train/test_distributed.py`` launches it as
``torchrun --nproc_per_node 2 --max-restarts 1 _torchrun_kill_worker.py train ...``. On the first
attempt (``TORCHELASTIC_RESTART_COUNT=0``) rank 1 exits abruptly (``os._exit``, no cleanup, like a
killed process) when it is about to run step ``$KILL_AT_STEP``; torchrun then stops rank 0 and starts
both again, and they resume from the last checkpoint.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from metaxfer.cli.main import main

# `import metaxfer.train.fit as m` would give the function: the package re-exports `fit` under that name.
fit_module = importlib.import_module("metaxfer.train.fit")

real_forward_backward = fit_module.forward_backward
calls = {"n": 0}


def forward_backward(*args, **kwargs):  # type: ignore[no-untyped-def]
    calls["n"] += 1
    step = int(os.environ["KILL_AT_STEP"])
    if (os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            and calls["n"] == step):
        Path(os.environ["KILL_MARKER"]).write_text(f"rank 1 killed at step {step}")
        os._exit(1)
    return real_forward_backward(*args, **kwargs)


fit_module.forward_backward = forward_backward

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
