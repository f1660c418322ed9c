"""The ``weightcast`` command installed by the wheel: the Rust binary the wheel carries
(``weightcast/_bin/weightcast``), run in place of this process, so that its output, exit codes
and signals are the command line's own; ``weightcast profile``, which runs models in PyTorch,
is the package's own (:mod:`weightcast._profile`)."""

import os
import signal
import sys


def _binary() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bin", "weightcast")


def main() -> None:
    if sys.argv[1:2] == ["profile"]:
        # Runs models in PyTorch: the Python side of the package does it.
        from ._profile import cli

        sys.exit(cli(sys.argv[2:]))
    exe = _binary()
    if not os.access(exe, os.X_OK):
        sys.stderr.write(
            f"weightcast: error: {exe} is missing: this wheel was built without the command "
            "(build wheels with scripts/wheel)\n"
        )
        sys.exit(1)
    # Python ignores SIGPIPE, and an ignored signal stays ignored across exec: give the command
    # the default, so that output piped into `head` ends it quietly.
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(exe, [exe, *sys.argv[1:]])


if __name__ == "__main__":
    main()
