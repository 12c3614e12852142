"""``python -m vnetseg`` is the ``vnetseg`` command (Slicer runs it with PythonSlicer)."""

import sys

from .cli import main

sys.exit(main())
