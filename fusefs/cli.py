"""`fusefs` command line (filled in as the filesystem issues land)."""

import sys


def main(argv=None) -> int:
    print("fusefs: the filesystem commands arrive with the filesystem issue; "
          "run `blockserver serve --help` for the block server", file=sys.stderr)
    return 2
