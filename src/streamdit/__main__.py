"""`python -m streamdit` is the same as the `streamdit` command."""

import sys

from streamdit.cli import main

sys.exit(main())
