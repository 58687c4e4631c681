"""One exception type for mistakes a user can fix, and the wrapper that runs a stage.

Stages raise `UserError` with a message that says what is wrong and what to do;
`run_stage` prints that message without a traceback and exits non-zero, so DVC
shows the user one clear line instead of a stack dump. It also turns SIGTERM
(a spot VM's preemption notice, `kill`, `podman stop`) into a prompt, clean exit.
"""

import os
import signal
import sys


class UserError(ValueError):
    """Bad input, bad params or a missing upstream output: the message says how to fix it."""


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it."""


def _raise_terminated(signal_number, frame):
    raise Terminated


def _default_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_stage(main) -> None:
    # Python's default for SIGTERM is to die at once, silently; raising instead lets the stage
    # say what happened. Outputs and checkpoints are written by atomic rename (dataset.atomic_path),
    # so wherever the exception lands, a file is either complete or absent.
    signal.signal(signal.SIGTERM, _raise_terminated)
    # A forked child (resize's decoding pool) gets the default back. This handler is Python-level, so it
    # runs only between bytecodes: a worker asleep on its pool's task lock when the pool terminates it
    # would never run it, and the stage would hang in the pool's join. The default ends it at once.
    os.register_at_fork(after_in_child=_default_sigterm)
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # Outputs are written atomically, so an interrupt leaves nothing half-written.
        print("interrupted: no output was written", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print(f"stopped by SIGTERM: {_stage_name()} wrote no partial output. A training stage keeps its last"
              " completed epoch in .checkpoints/, and a rerun (`dvc repro`) resumes from there.", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # os._exit, not sys.exit: the batch-loading and callback threads must not hold the process
        # past a preemption notice (often 30 s), and nothing is left to clean up.
        os._exit(128 + signal.SIGTERM)


def _stage_name() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "the stage"
