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
