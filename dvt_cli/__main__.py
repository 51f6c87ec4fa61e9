"""`python -m dvt_cli`, the same as the `dvt` command."""
import sys

from . import main

sys.exit(main())
