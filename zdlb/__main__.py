"""``python -m zdlb``: the ``zdlb`` command (deploy/zdlb.service runs ``python3 -I -m zdlb``)."""

import sys

from zdlb.daemon.entry import main

sys.exit(main())
