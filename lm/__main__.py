"""`python -m lm ...` (and so `torchrun --nproc-per-node N -m lm train ...`)."""

import sys

from lm.cli import main

sys.exit(main())
