"""`python -m tuneloop COMMAND ...`, which is also how `accelerate launch -m tuneloop evaluate ...` runs a command."""

from tuneloop.cli import console, exit_process

exit_process(console())
