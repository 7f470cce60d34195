"""`python -m dreambooth` (and so `accelerate launch -m dreambooth train ...`)."""

import sys

from dreambooth.cli import main

sys.exit(main())
