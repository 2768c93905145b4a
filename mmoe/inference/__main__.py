"""``python -m mmoe.inference``: the inference CLI (see :mod:`mmoe.inference.cli`)."""

import sys

from .cli import main

sys.exit(main())
