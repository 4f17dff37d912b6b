"""`python -m hvm`: the hvmlab command."""

import sys

from .cli import main

sys.exit(main())
