"""``python -m qcalib`` is the ``qcalib`` command."""

import sys

from qcalib.cli import main

sys.exit(main())
