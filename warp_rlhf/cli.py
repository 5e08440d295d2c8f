"""The ``warp-rlhf`` command line: one subcommand per user task, each a small function.

Bad input (config, model, checkpoint, arguments) exits with code 2 and one line naming what is wrong,
before any expensive work starts. Heavy libraries are imported inside the subcommands that need them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from warp_rlhf.config import ConfigError, dump_config, load_config
from warp_rlhf.models import ModelError

# Errors that mean "the user's input is wrong": printed as one line, exit code 2.
INPUT_ERRORS: tuple[type[Exception], ...] = (ConfigError, ModelError)


def _config_show(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(config))
    return 0


def _add_config(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="inspect configurations")
    actions = parser.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="print the resolved configuration as YAML")
    show.add_argument("--config", help="YAML file (defaults only if omitted)")
    show.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides, applied in order")
    show.set_defaults(handler=_config_show)


PARSERS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_config,)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other input error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="warp-rlhf", description="WARP: weight averaged rewarded policies.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except INPUT_ERRORS as exc:
        print(f"warp-rlhf: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
