"""`python -m loracast` runs the command line."""

import sys

from loracast.cli import main

sys.exit(main())
