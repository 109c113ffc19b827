"""``python -m i2x`` is the ``i2x`` command."""

from i2x.cli import main

raise SystemExit(main())
