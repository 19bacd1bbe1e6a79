"""``python -m anyflow``: see :mod:`anyflow.cli`."""

from anyflow.cli import main

raise SystemExit(main())
