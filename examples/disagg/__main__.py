"""``python -m examples.disagg``: run the disaggregated prefill/decode demo (see driver.py)."""

import sys

from .driver import main

sys.exit(main())
