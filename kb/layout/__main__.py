"""`python -m kb.layout`: see kb/layout/cli.py."""

import sys

from kb.layout.cli import main

sys.exit(main())
