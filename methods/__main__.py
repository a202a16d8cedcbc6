"""`python -m methods`: the registered methods, and the registry's property checks on any of them.

    python -m methods list                              # every registered method and the module it lives in
    python -m methods check my_package.my_method        # the checks on the methods that module registers
    python -m methods check lora oft                    # ... on registered methods, by name
    python -m methods check                             # ... on every registered method

A target is a registered method name or an import path (imported first, as a run's `method.module` is). One line
per check (`ok`, `skip` or `FAIL` with what differs), then a count; exit status 0 when every check passed, 1 when
any failed, 2 when a target is neither a method nor an importable method module.
"""

from __future__ import annotations

import argparse
import sys


def names_of(targets: list[str]) -> list[str]:
    """Method names for command-line targets: a registered name as it is, an import path as the names it registers."""
    from methods.registry import available, import_module

    names = []
    for target in targets:
        names += [target] if target in available() else import_module(target)
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m methods", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every registered method and its module")
    check = sub.add_parser("check", help="run the property checks (default: on every registered method)")
    check.add_argument("targets", nargs="*", help="method names or import paths such as my_package.my_method")
    args = parser.parse_args(argv)

    from methods import checks
    from methods.errors import MethodError
    from methods.registry import available, method_class

    if args.command == "list":
        for name in available():
            print(f"{name}  {method_class(name).__module__}")
        return 0
    try:
        names = names_of(args.targets) if args.targets else available()
    except MethodError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = []
    for result in checks.run(names):
        print(result.line(), flush=True)
        results.append(result)
    failed = sum(r.problem is not None for r in results)
    skipped = sum(r.skipped is not None for r in results)
    print(f"{len(results)} checks on {', '.join(names)}: {len(results) - failed - skipped} passed, {failed} failed, "
          f"{skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
