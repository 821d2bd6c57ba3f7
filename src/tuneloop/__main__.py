"""`python -m tuneloop COMMAND ...`, which is also how `accelerate launch -m tuneloop evaluate ...` runs a command."""

import sys

from tuneloop.cli import console

sys.exit(console())
