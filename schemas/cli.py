"""The command-line contract: one flag name per concept, old spellings kept.

Users' scripts call the stages' flags, so a renamed flag keeps its old
spelling as a hidden alias: not shown in ``--help``, accepted, and a
one-line deprecation note on standard error naming the new spelling.

The names every command uses (docs/design.md, "One name per concept"):

- ``--index``: the source index (Parquet files, a directory or a glob);
- ``--labels``: the label vocabulary (Parquet);
- ``--target``: the target's name (a ``configs/targets`` name, or the name recorded);
- ``--target-root`` and ``--target-layout``: where the target's images are, and their layout;
- ``--checkpoint``: a model file (the generalist, a fine-tuned model);
- ``--init``: fine-tuning's starting weights (a checkpoint, or ``none``);
- ``--arch``: an architecture name (``small``, ``resnet50``, ``inception_v3``);
- ``--output``: the directory a stage writes;
- ``--master``: the Spark master.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["ArgumentParser", "DeprecatedAlias", "PROG_ENV"]

#: Set by the ``adaptive-transfer`` command to the subcommand's name, which
#: the stage's parser then shows as its program name.
PROG_ENV = "ADAPTIVE_TRANSFER_PROG"


class DeprecatedAlias(argparse.Action):
    """Parses as the flag it stands for and prints one deprecation line."""

    def __init__(self, option_strings, dest, new: str, target: argparse.Action, **kwargs):
        self.new, self.target = new, target
        super().__init__(option_strings, dest, nargs=target.nargs, type=target.type, choices=target.choices,
                         metavar=target.metavar, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        self.target(parser, namespace, values, self.new)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :meth:`add_alias` for renamed flags.

    Formatted with ``RawDescriptionHelpFormatter`` unless told otherwise, so a
    module docstring used as ``description`` keeps its layout; named
    ``adaptive-transfer STAGE`` when run as that subcommand (:data:`PROG_ENV`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        if os.environ.get(PROG_ENV):  # run as a subcommand of the adaptive-transfer command
            kwargs["prog"] = os.environ[PROG_ENV]
        super().__init__(*args, **kwargs)
        self._aliased_required: list[argparse.Action] = []

    def add_alias(self, old: str, new: str) -> None:
        """Accept ``old`` as a hidden spelling of the already-defined flag
        ``new``: the same type, choices and action (``append``,
        ``store_true``, ...), and ``PROG: OLD is deprecated; use NEW`` on
        standard error each time it is used. A required ``new`` is satisfied
        by either spelling."""
        target = next((a for a in self._actions if new in a.option_strings), None)
        if target is None:
            raise ValueError(f"{self.prog}: no flag {new} to alias as {old}")
        if target.required:
            target.required = False
            self._aliased_required.append(target)
        self.add_argument(old, dest=target.dest, action=DeprecatedAlias, new=new, target=target)

    def add_aliases(self, renamed: dict[str, str]) -> None:
        """:meth:`add_alias` for each ``{old: new}``."""
        for old, new in renamed.items():
            self.add_alias(old, new)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        missing = [a.option_strings[0] for a in self._aliased_required if getattr(namespace, a.dest, None) is None]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return namespace, extras
