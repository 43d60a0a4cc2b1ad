"""`python -m pipeline ...` is the same as the `rmt` console script."""

import sys

from pipeline.cli import main

sys.exit(main())
