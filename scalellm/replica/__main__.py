"""`python -m scalellm.replica ...` is `scalellm replica ...`."""

import sys

from scalellm.cli import main

if __name__ == "__main__":
    main(["replica", *sys.argv[1:]])
