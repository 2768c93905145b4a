"""``python -m mmoe.infer`` kept working for existing scripts; the CLI lives in :mod:`mmoe.inference.cli`."""

import sys

from mmoe.inference.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
