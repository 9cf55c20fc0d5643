"""`python -m worker` is the `tokenq` command."""

from worker.cli import main

main()
