"""The `main` of every step script: parse the command line, take the step's options from it, check
where the results go, run the step through the driver. Light to import: the driver (and torch) load
only once the command line is checked, so `--help` and argument errors answer at once."""

from __future__ import annotations

import argparse
import importlib
from typing import Callable

from ..cli import check_run_args, main_guard, options_of, remove_empty
from ..options import Options


def step_main(build_parser: Callable[[], argparse.ArgumentParser], options: type[Options], step: str,
              values: Callable[[argparse.Namespace], dict] = lambda args: {},
              check: Callable[[argparse.Namespace], None] = lambda args: None,
              instead: Callable[[argparse.Namespace], bool] = lambda args: False) -> Callable[[], None]:
    """A script's main for `step` (a module of this package with a `STEP`): `values` gives options
    the command line spells differently (step 3's mode flags), `check` refuses what else can be
    wrong with the arguments, `instead` does another job the script offers and says so (True)."""

    @main_guard
    def main() -> None:
        args = build_parser().parse_args()
        check(args)
        checked = options_of(options, args, **values(args))
        created = check_run_args(args)
        try:
            if not instead(args):
                run_step(step, args, checked)
        except BaseException:  # a refused or failed run leaves no folder it made and left empty
            remove_empty(created)
            raise

    return main


def run_step(step: str, args: argparse.Namespace, options: Options) -> None:
    """`step`'s module's STEP through the driver, both imported now."""
    driver = importlib.import_module(f"{__package__}.driver")
    driver.run_script(importlib.import_module(f"{__package__}.{step}").STEP, args, options)
