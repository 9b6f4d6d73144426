"""``python -m hutch`` = the ``hutch`` command (how the CLI starts a background ``hutch serve``)."""

from hutch.cli import main

main()
