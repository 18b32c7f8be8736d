"""``python -m drnb``: the same as the ``drnb`` command."""

import sys

from drnb.cli import main

sys.exit(main())
