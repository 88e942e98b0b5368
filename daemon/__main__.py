"""`python -m ttsd.daemon` is `ttsd`."""

from .cli import main

raise SystemExit(main())
