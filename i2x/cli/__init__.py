"""The ``i2x`` command (also ``python -m i2x``): one subcommand per module of this package.

    i2x demo       [FOLDER] [--quick]            the whole method on the default data, with a report
    i2x train      RUN --data fashion-mnist      a small model with online tracking (stages 1-2)
    i2x track      --run RUN --checkpoints DIR   post hoc over saved checkpoints (stages 1-2)
    i2x analyze    RUN                           stages 3-8
    i2x curate     RUN --data NAME               stage 9: the targeted training samples
    i2x experiment RUN --data NAME               stage 9: arms x seeds of fine-tuning
    i2x report     RUN                           RUN/report/index.html
    i2x explain    RUN INDEX | --model WEIGHTS IMAGE|FOLDER
    i2x bench      [MODEL]                       what explaining costs: forward, explain, training step
    i2x info       [RUN]                         a run's contents, or this build

Exit status: 0 done, 1 the work failed (a torch error, a full disk, a run locked by another
process), 2 bad usage or bad input (missing files, a corrupt run, bad options, data that do not
match the run), 130 interrupted (every resumable command picks up where it stopped). Errors are one
line on stderr; ``--debug`` shows the traceback instead. ``--json`` prints one JSON document on
stdout; ``--quiet`` silences progress bars and status lines (bars are off anyway when stderr is not
a terminal).

Only the standard library is imported until a subcommand runs: ``i2x --help`` needs no torch.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

__all__ = ["main", "build_parser"]

# Each module registers its subcommands (``register(subparsers)``, ``set_defaults(handler=...)``).
_COMMAND_MODULES = ("demo", "runs", "loop", "report", "explain", "bench")
# Commands whose timings are the point (bench) or that do no torch work (info) keep the threads as they are.
_KEEP_THREADS = ("bench", "info")
# Errors of the input (exit 2) as opposed to failures of the work (exit 1).
_INPUT_ERRORS = (ValueError, TypeError, LookupError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
_MAX_MESSAGE = 600


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="i2x", description="Structured explanations of image classifiers (I2X): why does it look there?",
        epilog="`i2x demo` runs everything on the default data; `i2x COMMAND --help` for each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def _one_line(message) -> str:
    text = " ".join(str(message).split())  # e.g. load_state_dict's multi-line report
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE - 3] + "..."


def _with_flag_names(parser: argparse.ArgumentParser, command: str, message: str) -> str:
    """The Python names of options in ``message`` ("n_pairs: expected ...") as the command's flags
    ("--n-pairs: expected ..."): the user typed the flag and should read it back."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[command]._actions:
        flags = [f for f in action.option_strings if f.startswith("--")]
        if flags and action.dest != "help":
            message = re.sub(rf"(^|; |\(|, ){re.escape(action.dest)}(?=: )", rf"\g<1>{flags[0]}", message)
    return message


def _is_input_error(error: BaseException) -> bool:
    # A run locked by another writer is not the user's input being wrong (i2x.store.RunLockedError).
    store = sys.modules.get("i2x.store")
    locked = store is not None and isinstance(error, store.RunLockedError)
    return isinstance(error, _INPUT_ERRORS) and not locked


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from i2x._internal.progress import configure

    if "torch" not in sys.modules and args.command not in _KEEP_THREADS:
        # Before torch starts its thread pools: on a machine others use, sleeping OpenMP threads and
        # one per idle core (i2x._internal.threads; measured in benchmarks/RESULTS.md).
        from i2x._internal.threads import configure_cli_threads

        configure_cli_threads()

    configure(quiet=args.quiet or args.json)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"i2x {args.command}: interrupted; what was finished is kept: run the same command again to resume",
              file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        input_error = _is_input_error(e)
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        kind = "error" if input_error else f"failed: {type(e).__name__}"
        text = _with_flag_names(parser, args.command, _one_line(message)) if input_error else _one_line(message)
        print(f"i2x {args.command}: {kind}: {text}", file=sys.stderr)
        return 2 if input_error else 1
    finally:
        configure(quiet=False)


if __name__ == "__main__":
    raise SystemExit(main())
