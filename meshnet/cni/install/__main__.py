"""`python -m meshnet.cni.install`: the installer daemon (see `main.main`)."""

import sys

from meshnet.cni.install.main import main

sys.exit(main())
