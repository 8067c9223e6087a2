"""The `protege` console script. A module outside the package, so that a Ctrl-C while the package (and torch)
imports is caught here too: it prints "interrupted" and exits 130 instead of a traceback."""
import sys


def main() -> None:
    try:
        from protege.cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted (while starting); nothing was written", file=sys.stderr)
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
