"""``python -m metaxfer ...`` (the same as the ``metaxfer`` command)."""

from metaxfer.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
