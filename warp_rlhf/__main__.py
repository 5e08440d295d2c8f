"""``python -m warp_rlhf``: the same CLI as the ``warp-rlhf`` console script (used by ``ray job submit``)."""

import sys

from warp_rlhf.cli import main

sys.exit(main())
