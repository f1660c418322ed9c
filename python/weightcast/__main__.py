"""The ``weightcast`` command installed by the wheel: the same program as the Rust binary
(its code is linked into the extension), with the same output and exit codes."""

import signal
import sys

from ._weightcast import cli_main


def main() -> None:
    # Output piped into `head` ends quietly, as the binary does (Python ignores SIGPIPE).
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(cli_main(["weightcast", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
