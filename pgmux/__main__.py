"""`python -m pgmux config.ini`."""

import sys

from pgmux.cli import main

sys.exit(main())
