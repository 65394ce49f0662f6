"""``python -m filtersurgery`` (also under ``torchrun``)."""
import sys

from filtersurgery.cli.main import main

sys.exit(main())
