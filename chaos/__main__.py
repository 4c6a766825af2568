"""`python -m chaos`: see chaos/run.py."""

import sys

from chaos.run import main

sys.exit(main())
