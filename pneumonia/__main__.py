"""`python -m pneumonia ...`: the CLI without the console script (e.g. in a Ray job's working dir)."""

import sys

from pneumonia.cli import main

sys.exit(main())
