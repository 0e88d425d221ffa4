"""The reliability tests reuse the raw protocol client of the integration tests (tests/integration/pgwire.py)."""

from __future__ import annotations

import sys
from pathlib import Path

_INTEGRATION = str(Path(__file__).resolve().parent.parent / "integration")
if _INTEGRATION not in sys.path:
    sys.path.append(_INTEGRATION)
