"""The ``weightcast`` command installed by the package: the command-line library linked into the
extension (the same code the ``weightcast`` binary runs), called in this process with the
arguments, so that its output, progress bars and exit codes are the command line's own. A wheel
built from the source distribution has the command too. ``weightcast profile``, which runs
models in PyTorch, is the package's own (:mod:`weightcast._profile`)."""

import signal
import sys


def main() -> None:
    if sys.argv[1:2] == ["profile"]:
        # Runs models in PyTorch: the Python side of the package does it.
        from ._profile import cli

        sys.exit(cli(sys.argv[2:]))
    from ._weightcast import cli_main

    # Python ignores SIGPIPE: give the command the default, so that output piped into `head`
    # ends it quietly, as the binary does.
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(cli_main(["weightcast", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
