from __future__ import annotations

import sys

from kiteq.ops.dashboard.main import main

sys.exit(main())
