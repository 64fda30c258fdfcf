"""python -m unlock_export: the command line."""

import sys

from .cli import main

sys.exit(main())
