"""``python -m vela``: the ``vela`` command (see :mod:`vela.cli`)."""
import sys

from .cli import main

sys.exit(main())
