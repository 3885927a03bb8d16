"""`python -m kvbound ...` runs the command-line interface."""

from kvbound.cli.app import main

raise SystemExit(main())
