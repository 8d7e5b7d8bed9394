"""`python -m scalellm.replica ...`: the same as `scalellm replica ...`, without the other subcommands."""

import argparse

from scalellm.replica.launch import add_replica_args, run_replica

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m scalellm.replica", description="run one replica")
    add_replica_args(parser)
    run_replica(parser.parse_args())
