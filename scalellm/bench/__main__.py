"""``python -m scalellm.bench ...`` runs ``scalellm bench``."""

import sys

from scalellm.bench.cli import main

sys.exit(main())
