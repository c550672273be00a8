"""The `vela` console command.

    vela inspect NAME [--json] [--check] [--keys N] [--watch SECONDS]

``inspect`` is ``tools/inspect_shm.py`` (the code lives in :mod:`vela.inspect`).
"""
import argparse
import sys

__all__ = ["main"]

COMMANDS = {
    "inspect": "show a live cache of this host without waiting for its locks",
}


def main(argv=None):
    """Entry point of `vela`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        command, rest = argv[0], argv[1:]
        if command == "inspect":
            from .inspect import main as inspect_main
            return inspect_main(rest, prog="vela inspect")
    parser = argparse.ArgumentParser(
        prog="vela", description="Vela command-line tools.",
        epilog="commands:\n" + "\n".join(f"  {name:10} {text}" for name, text in COMMANDS.items())
        + "\n\n`vela COMMAND --help` for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS), help=argparse.SUPPRESS)
    parser.parse_args(argv[:1])  # prints usage and exits 2 for a missing or unknown command
    return 2


if __name__ == "__main__":
    sys.exit(main())
