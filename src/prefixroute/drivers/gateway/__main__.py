"""`python -m prefixroute.drivers.gateway`: the same as `prefixroute serve`."""

import sys

from prefixroute.drivers.gateway.server import main

sys.exit(main())
