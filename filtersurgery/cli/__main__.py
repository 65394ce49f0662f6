"""``python -m filtersurgery.cli ...``: the same as ``filtersurgery ...``."""
import sys

from filtersurgery.cli.main import main

sys.exit(main())
