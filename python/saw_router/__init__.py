"""`saw-router`: the Rust router (saw_router._native, built by maturin) behind a console script."""

from __future__ import annotations

import signal
import sys

from saw_router import _native

__all__ = ["main"]


def main() -> None:
    # Hand SIGINT to the router: with Python's handler installed, Ctrl-C would surface as a
    # KeyboardInterrupt after the router had already shut down cleanly.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(_native.run(sys.argv, sys.executable))


if __name__ == "__main__":
    main()
