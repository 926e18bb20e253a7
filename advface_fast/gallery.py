"""``python -m advface_fast.gallery ARGS`` = ``advface gallery ARGS``: the module entry point that
torchrun needs (``torchrun --nproc_per_node 4 -m advface_fast.gallery --input SRC --out DIR ...``).
The command itself lives in advface_fast.jobs.cli."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    """``python -m advface_fast.gallery ARGS`` = ``advface gallery ARGS``."""
    from .cli import main as cli_main

    return cli_main(["gallery", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
