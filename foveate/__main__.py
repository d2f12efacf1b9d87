"""``python -m foveate``: the same entry point as the ``foveate`` console script."""

from __future__ import annotations

import sys

from foveate.cli import main

if __name__ == "__main__":
    sys.exit(main())
