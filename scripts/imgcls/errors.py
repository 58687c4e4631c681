"""One exception type for mistakes a user can fix, and the wrapper that prints it.

Stages raise `UserError` with a message that says what is wrong and what to do;
`run_stage` prints that message without a traceback and exits non-zero, so DVC
shows the user one clear line instead of a stack dump.
"""

import sys


class UserError(ValueError):
    """Bad input, bad params or a missing upstream output: the message says how to fix it."""


def run_stage(main) -> None:
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # Outputs are written atomically, so an interrupt leaves nothing half-written.
        print("interrupted: no output was written", file=sys.stderr)
        sys.exit(130)
