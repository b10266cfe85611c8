"""``python -m biotemplate.cli``: the same as the ``biotemplate`` console script."""

from .main import main

raise SystemExit(main())
