"""python -m bench (run from the repository root with the virtualenv's python)."""

import sys

from bench.main import main

if __name__ == "__main__":
    sys.exit(main())
