"""``python -m fastunet.bench``: the benchmark table (fastunet.bench.cli.main)."""

import sys

from .cli import main

sys.exit(main())
