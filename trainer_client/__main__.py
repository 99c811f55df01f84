import sys

from trainer_client.cli import main

sys.exit(main())
