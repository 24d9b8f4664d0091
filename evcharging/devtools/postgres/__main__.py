"""``python -m evcharging.devtools.postgres`` (see :mod:`.cli`)."""

import sys

from evcharging.devtools.postgres.cli import main

sys.exit(main())
