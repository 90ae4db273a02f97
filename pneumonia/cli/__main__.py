"""`python -m pneumonia.cli ...`: the same command as `pneumonia` and `python -m pneumonia`."""

import sys

from pneumonia.cli import main

sys.exit(main())
