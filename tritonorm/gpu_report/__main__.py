"""``python -m tritonorm.gpu_report``: see tritonorm/gpu_report/main.py."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
