"""``python -m t3s``: the ``t3s`` command (`t3s.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
