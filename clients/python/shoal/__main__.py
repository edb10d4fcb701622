"""`python -m shoal`: the `shoal` command."""

from shoal.cli import main

main()
