"""How a script ends: a user mistake as one line and exit status 2, a run stopped by its collapse
guard as one line and 3, Ctrl-C with advice that fits where the run stopped (130), a closed
output pipe quietly (141)."""
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from utils.data.splits import DataError
from utils.training import distributed


class UserError(Exception):
    """A mistake in the user's input. Scripts print its one-line message and exit with 2."""


class Collapsed(UserError):
    """A training run stopped by its collapse guard (utils/training/balance.py); exit status 3."""


class Interrupted(Exception):
    """Ctrl-C inside a training run; the message says whether and how to continue it."""


NOTHING_TO_RESUME = "interrupted before an epoch finished, so there is nothing to resume: run the same command again"


def run_main(main: Callable[[], None], interrupted: Optional[str] = None) -> None:
    """Run a script's main: user mistakes become one line on stderr and exit status 2; Ctrl-C
    prints the run's advice (``Interrupted``), else ``interrupted`` or that nothing is there to
    resume, and exits with 130; a closed output pipe (``| head``) ends the script quietly."""
    prog = Path(sys.argv[0]).name
    # Under torchrun every process meets the same mistake: one of them says so.
    speaks = os.environ.get("RANK", "0") == "0"
    try:
        main()
        # After main has returned, so no DDP wrapper still holds the process group; not after an
        # error, where another process may never reach the barrier.
        distributed.shutdown()
    except Collapsed as err:
        if speaks:
            print(f"{prog}: stopped: {err}", file=sys.stderr)
        sys.exit(3)
    except (UserError, DataError) as err:
        if speaks:
            print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as advice:
        if speaks:
            print(f"{prog}: {advice}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        if speaks:
            print(f"{prog}: {interrupted or NOTHING_TO_RESUME}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader has gone: silence the interpreter's own flush of stdout at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
