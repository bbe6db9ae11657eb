"""What every stage script shares on the command line: its parser (help with defaults, --debug) and
how it ends on a user error (one line on stderr, exit status 1; --debug shows the traceback).

A stage script is ``def main(argv=None)`` (called in-process by tests: errors raise as usual) plus
``if __name__ == "__main__": run_stage(main)`` (the command line: user errors become one line).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import yaml

# What a user can cause and fix: a missing or unreadable file or folder (OSError), a bad value or an
# unknown param (ValueError; DatasetError is one), a missing params key (KeyError), a broken YAML file.
USER_ERRORS = (OSError, ValueError, KeyError, yaml.YAMLError)
DEBUG_ENV = "FERPIPE_DEBUG"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and every option's default (when it has one) after its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is argparse.SUPPRESS or default is False
                or default == [] or action.nargs == 0 or not action.option_strings):
            return text
        shown = "''" if default == "" else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def stage_parser(doc: str | None, epilog: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser for a stage script: the docstring as description, defaults shown, --debug. No
    abbreviated options: a removed flag must not pass as the prefix of another (--passes of --passes-param)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, epilog=epilog, formatter_class=HelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--debug", action="store_true", help=f"on an error, show the Python traceback (or set {DEBUG_ENV}=1)")
    return p


def error_line(err: BaseException) -> str:
    """One line for an exception: its message (a KeyError's key unquoted), the class name when it has none."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, OSError) and err.filename and str(err.filename) not in str(msg):
        msg = f"{msg}: {err.filename}"
    msg = " ".join(str(msg).split()) or type(err).__name__
    return msg if isinstance(err, (ValueError, KeyError)) else f"{type(err).__name__}: {msg}"


def run_stage(main, argv: list[str] | None = None) -> None:
    """Run a stage's main(argv) from the command line; a user error exits 1 with one line on stderr."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    name = Path(sys.argv[0]).name or "stage"  # as argparse names the script in its usage errors
    try:
        main(argv)
    except USER_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(f"{name}: error: {error_line(err)}" + ("" if debug else " (--debug for the traceback)"),
              file=sys.stderr)
        sys.exit(1)
