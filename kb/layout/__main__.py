"""`python -m kb.layout`: see kb/layout/cli.py."""

import sys

from kb.layout.cli import main

if __name__ == "__main__":
    sys.exit(main())
