"""``python -m tritonorm`` (and the ``tritonorm`` console script): see tritonorm/cli.py."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
