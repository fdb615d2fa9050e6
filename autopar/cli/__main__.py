"""``python -m autopar.cli``: the ``autopar`` command where the console script is not on PATH."""
import sys

from . import main

sys.exit(main())
