"""Draws PNG plots from the benchmark's JSON rows: `python bench/plot.py [results.jsonl ...] [--run ID]`.

The same as `python -m fastrnn plot`; the drawing lives in fastrnn/bench/plot.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastrnn.bench import plot  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench/plot.py")
    plot.add_arguments(parser)
    sys.exit(plot.run(parser.parse_args()))
