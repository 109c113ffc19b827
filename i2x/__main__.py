"""``python -m i2x`` is the ``i2x`` command."""

from .cli import main

raise SystemExit(main())
