"""``python -m benchmarks [workload ...] [--systems ...] [--repeat N] [--quick] [--json PATH]``."""

import sys

from .runner import main

sys.exit(main())
