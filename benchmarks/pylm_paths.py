"""Where the benchmarks find the shared trained decoder and its data: ``../shared/models/pylm`` next to the checkout
(as CI lays it out), with ``calibration.txt`` and ``heldout.txt`` in ``../shared/models/pylm-data``."""

import os

PYLM = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "models", "pylm"))
PYLM_DATA = os.path.join(os.path.dirname(PYLM), "pylm-data")
