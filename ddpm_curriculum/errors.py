"""The one exception type for bad user input.

Anything the user can fix (a bad config value, a missing dataset, an incompatible checkpoint)
raises ``UserError`` with a one-line message naming the problem and the fix. The scripts catch
it, print ``error: <message>`` and exit with code 2, without a traceback.
"""


class UserError(Exception):
    """Bad input the user can fix; printed as one line, exit code 2."""

    exit_code = 2


def run_cli(main, argv=None) -> int:
    """Run a script's ``main(argv)``; a UserError becomes ``error: <message>`` on stderr and exit code 2."""
    import sys

    try:
        return main(argv) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
