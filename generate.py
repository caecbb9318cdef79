"""generate.py: filled in by a later issue (see README.md, "Status")."""

import sys

if __name__ == "__main__":
    print("error: generate.py is not implemented yet; see README.md (Status) for what works today", file=sys.stderr)
    sys.exit(2)
