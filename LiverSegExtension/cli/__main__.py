"""``python -m LiverSegExtension.cli``: the ``liverseg`` command."""

import sys

from LiverSegExtension.cli import main

sys.exit(main())
