"""``python -m marslib.worker``: started by marsd, never by hand."""

import sys

from marslib.worker.process import main

sys.exit(main())
