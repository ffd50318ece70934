"""``python -m dsx``: the same as the ``dsx`` command."""

from dsx.cli import main

raise SystemExit(main())
