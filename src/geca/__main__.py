"""`python -m geca`: the command line."""

from geca.cli.main import main

main()
