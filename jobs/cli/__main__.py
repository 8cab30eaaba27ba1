"""`python -m jobs.cli COMMAND` (the Makefile's way), the same as the `sae-platform` console script."""

import sys

from jobs.cli import main

sys.exit(main())
