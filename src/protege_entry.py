"""The `protege` console script. A module outside the package, so that a Ctrl-C while the package (and torch)
imports is caught here too: it prints "interrupted" and exits 130 instead of a traceback."""
import signal
import sys

STARTING = "interrupted (while starting); nothing was written"


def main() -> None:
    # While torch imports, a KeyboardInterrupt can be swallowed half-way and leave numpy half-loaded (an ImportError
    # later); so a Ctrl-C during the imports is only recorded here, and acted on once they are done.
    pressed: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, lambda *_: pressed.append(1))
    try:
        from protege.cli import main as cli_main
    except KeyboardInterrupt:
        pressed.append(1)
    finally:
        if previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous)
    if pressed:
        print(STARTING, file=sys.stderr)
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
