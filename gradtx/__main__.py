"""``python -m gradtx``: the command-line tool (see :mod:`gradtx.cli`)."""

from gradtx.cli import main

raise SystemExit(main())
