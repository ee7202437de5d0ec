"""``python -m natskit``: the same as the ``natskit`` command."""

import sys

from natskit.cli import main

sys.exit(main())
