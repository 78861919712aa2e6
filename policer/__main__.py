"""``python -m policer`` runs the command line."""

import sys

from policer.cli import main

sys.exit(main())
