"""``python -m postfix_mtasts.tlsrpt``: the report command on its own."""

import sys

from postfix_mtasts.tlsrpt import run

sys.exit(run())
