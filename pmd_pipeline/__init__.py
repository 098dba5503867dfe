"""PMD pipeline: raw public metadata -> filtered candidates -> fetched images -> webdataset shards."""

__version__ = "0.1.0"

import os as _os

# albumentations (through img2dataset) asks the network for updates at import time; never do that.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Ray reports usage statistics to its makers unless told not to; nothing we start talks to other hosts.
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
