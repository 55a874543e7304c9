"""`python -m nextstep_core`: the command-line generator (cli.main); exits with its status."""

import sys

from .cli import main

sys.exit(main())
