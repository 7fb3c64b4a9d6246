"""`python -m captune.cli`: the `captune` command, as `accelerate launch -m` and `torchrun -m` start it."""

import sys

from captune.cli import main

sys.exit(main())
