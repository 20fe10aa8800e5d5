"""`python -m smtp2api` runs the command line."""

from smtp2api.cli import main

raise SystemExit(main())
