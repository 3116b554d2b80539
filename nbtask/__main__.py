"""``python -m nbtask``."""

import sys

from nbtask.cli import main

sys.exit(main())
