"""``python -m ditpass ...``: the same as the ``ditpass`` command."""
import sys

from .tools.cli import main

sys.exit(main())
