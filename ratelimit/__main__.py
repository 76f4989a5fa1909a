"""`python -m ratelimit`: the same command as the `ratelimit` console script."""

import sys

from ratelimit.cli import main

sys.exit(main())
