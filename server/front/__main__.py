"""``python -m sepals.server.front``: serve the public front."""

from sepals.server.front.cli import main

raise SystemExit(main())
