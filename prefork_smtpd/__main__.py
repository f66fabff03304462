"""``python -m prefork_smtpd``: the same as ``prefork-smtpd``."""

import sys

from prefork_smtpd.cli.server import main

sys.exit(main())
