"""``python -m visedit``: the same as the ``visedit`` console script."""
from visedit.cli import main

raise SystemExit(main())
