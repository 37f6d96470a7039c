"""``python -m cogvx.engine.cli`` (and ``torchrun ... -m cogvx.engine.cli``)."""

import sys

from . import main

sys.exit(main())
