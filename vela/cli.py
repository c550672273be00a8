"""The `vela` console command.

    vela inspect NAME [--json] [--check] [--keys N] [--watch SECONDS]

``inspect`` is ``tools/inspect_shm.py`` (the code lives in :mod:`vela.inspect`).
"""
import sys

__all__ = ["main"]

COMMANDS = {
    "inspect": "show a live cache of this host without waiting for its locks",
}

USAGE = ("usage: vela COMMAND [ARGS...]\n\ncommands:\n"
         + "".join(f"  {name:10} {text}\n" for name, text in COMMANDS.items())
         + "\n`vela COMMAND --help` shows the options of a command.\n")


def main(argv=None):
    """Entry point of `vela`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        if argv:
            sys.stderr.write(f"vela: unknown command {argv[0]!r}\n")
        sys.stderr.write(USAGE)
        return 2
    from .inspect import main as inspect_main
    return inspect_main(argv[1:], prog="vela inspect")


if __name__ == "__main__":
    sys.exit(main())
