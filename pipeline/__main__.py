"""``python -m pipeline <stage>``: see :mod:`pipeline.app.cli`."""

import sys

from pipeline.app.cli import main

sys.exit(main())
