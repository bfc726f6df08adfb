"""
The C{pgws} command (also C{python -m pgws}): tools around the server, one subcommand each.  The
server itself runs under twistd (C{twistd -n pgws --config FILE}), which owns its start-up.

    pgws token ...    mint a token the configured server accepts (L{pgws._mint})
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

USAGE = "usage: pgws token [options]   (pgws token --help; the server runs as twistd -n pgws)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the subcommand C{argv[0]} with the rest; the exit status (2 for a bad command)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args and args[0] == "token":
        from pgws._mint import main as token

        return token(args[1:])
    what = f'unknown command "{args[0]}"' if args else "no command given"
    sys.stderr.write(f"pgws: {what}; {USAGE}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
