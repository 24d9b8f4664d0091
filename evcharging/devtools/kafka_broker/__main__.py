"""``python -m evcharging.devtools.kafka_broker`` (see :mod:`.cli`)."""

import sys

from evcharging.devtools.kafka_broker.cli import main

sys.exit(main())
