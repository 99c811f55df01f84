"""``python -m generator_server``: the same as the ``generator-server`` command."""

import sys

from generator_server.cli import main

if __name__ == "__main__":
    sys.exit(main())
