"""``python -m gearshift``: the command line."""

from gearshift.cli import main

main()
