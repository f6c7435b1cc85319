"""`python -m fastrnn bench|check|plot|report|info`: see fastrnn/bench/cli.py and docs/benchmarks.md."""

import sys

from fastrnn.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
