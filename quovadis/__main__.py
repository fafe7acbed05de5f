"""`python -m quovadis ...` is the `quovadis` command."""

import sys

from quovadis.jobs.cli import main

sys.exit(main())
