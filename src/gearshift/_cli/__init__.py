"""The command line's private pieces; ``gearshift.cli`` holds only the click commands."""
