"""`python -m fxopt …` is the `fxopt` command."""

from fxopt.console.cli import main

main()
