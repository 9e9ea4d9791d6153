"""``python -m adamkit [demo]``."""

import sys

from .cli import main

sys.exit(main())
