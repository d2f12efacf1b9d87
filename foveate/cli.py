"""The ``foveate`` command line: one entry point, subcommands owned by the packages that run them.

Two modules register subcommands; this file only gathers them and dispatches::

    service.cli.register(subparsers)    serve, api, worker
    clients.cli.register(subparsers)    replay, demo, bridge

The contract for such a module:

- it defines ``register(subparsers: argparse._SubParsersAction) -> None``, which adds its
  subcommands with ``subparsers.add_parser(...)`` and ``parser.set_defaults(func=handler)``;
- ``handler(args: argparse.Namespace) -> int | None`` runs the command and returns its exit
  status (``None`` means 0);
- ``register`` stays cheap: torch, uvicorn and the like are imported inside the handlers, so that
  ``foveate --help`` answers at once.

A module that is not there leaves its commands out; a module that is there but fails to import
(a missing dependency, a syntax error) is an error, never silently skipped.

Examples
--------
>>> main(["--version"])  # doctest: +SKIP
foveate 0.1.0
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from foveate import __version__

# The modules that own subcommands, in the order their commands appear in --help.
COMMAND_MODULES: tuple[str, ...] = ("service.cli", "clients.cli")

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _import_if_present(name: str) -> ModuleType | None:
    """Import ``name``, or return None when that module (or its package) does not exist."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only the absence of the module itself means "no such commands"; a dependency missing
        # *inside* it (exc.name == "fastapi", say) is a broken install and must surface.
        parts = name.split(".")
        own_names = {".".join(parts[: i + 1]) for i in range(len(parts))}
        if exc.name in own_names:
            return None
        raise


def build_parser(modules: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser with the subcommands of every present command module.

    Parameters
    ----------
    modules
        Dotted names of modules that define ``register(subparsers)``; default :data:`COMMAND_MODULES`.

    Returns
    -------
    argparse.ArgumentParser
        The parser; each subcommand's namespace carries ``func``.

    Raises
    ------
    TypeError
        If a present module does not define a callable ``register``.
    """
    parser = argparse.ArgumentParser(
        prog="foveate",
        description="Online streaming learner for eye-tracking research (R-JEPA trained by RFP).",
    )
    parser.add_argument("--version", action="version", version=f"foveate {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=_LOG_LEVELS,
        help="logging level for the command (default: %(default)s)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES if modules is None else modules:
        module = _import_if_present(name)
        if module is None:
            continue
        register = getattr(module, "register", None)
        if not callable(register):
            raise TypeError(f"{name} must define register(subparsers) to add foveate subcommands")
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``foveate`` command line.

    Parameters
    ----------
    argv
        Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: the handler's, 2 for a usage error, 1 for a foveate error, 130 on Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        if args.command is None:
            parser.print_help(sys.stderr)
        else:
            print(
                f"foveate: command {args.command!r} registered no handler (set_defaults(func=...))",
                file=sys.stderr,
            )
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        status = func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A FoveateError can only come from an imported learner.errors; looking it up instead of importing
        # it keeps learner (and torch) out of commands that never load them, such as the tracker bridges.
        errors = sys.modules.get("learner.errors")
        if errors is None or not isinstance(exc, errors.FoveateError):
            raise
        # Deliberate errors carry a message that says what to fix; a traceback adds nothing.
        print(f"foveate {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
