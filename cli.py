"""Run evoreap from a checkout without installing: ``python cli.py search --budget 0.5``."""

import sys

from evoreap.cli import main

if __name__ == "__main__":
    sys.exit(main())
