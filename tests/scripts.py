"""Run a step script's main() in-process, as the shell would, and capture its exit status."""

import importlib
import sys


def run_main(module_name: str, argv: list[str]) -> int:
    module = importlib.import_module(module_name)
    saved = sys.argv
    sys.argv = [f"{module_name}.py", *map(str, argv)]
    try:
        module.main()
    except SystemExit as e:
        return e.code or 0
    finally:
        sys.argv = saved
    return 0


def interrupting(real, on_call: int):
    """A stand-in for `real` that raises KeyboardInterrupt on call number `on_call`, as Ctrl-C would."""
    calls = []

    def stand_in(*args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return stand_in
