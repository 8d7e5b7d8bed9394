"""The reliability tests share the in-process gateway fakes of tests/integration."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
