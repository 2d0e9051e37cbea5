"""`python -m lorafit ...`: the same as the `lorafit` command."""

import sys

from lorafit.cli import main

if __name__ == "__main__":
    sys.exit(main())
