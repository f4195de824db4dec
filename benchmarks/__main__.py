"""One entry point for the benchmark scripts: ``python -m benchmarks <subcommand> [args]``.

A subcommand is a script of this folder that has a ``main(argv)``; its one-line description is the first line
(sentence) of its docstring.  ``python -m benchmarks --help`` lists them without importing any (no torch at start-up);
``python -m benchmarks <subcommand> --help`` shows that script's own options.  ``python -m benchmarks.<name>``
still runs a script alone.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def subcommands() -> dict[str, str]:
    """Name -> the first line of its docstring (its first paragraph where that sentence goes on), for every module
    of this folder with a top-level ``main``."""
    found = {}
    for path in sorted(HERE.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            first = (ast.get_docstring(tree) or "").strip().split("\n\n", 1)[0]
            found[path.stem] = " ".join(first.split()).replace("``", "`")
    return found


def usage(commands: dict[str, str]) -> str:
    width = max(map(len, commands), default=0)
    lines = ["usage: python -m benchmarks <subcommand> [args]      (python -m benchmarks <subcommand> --help)", "",
             "subcommands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in commands.items()]
    lines += ["", "benchmarks/README.md says what each one measures and how to read the results."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = subcommands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        if argv[1:2] and argv[0] == "help":  # python -m benchmarks help <subcommand>
            return main([argv[1], "--help"])
        print(usage(commands))
        return 0 if argv else 2
    name, rest = argv[0].replace("-", "_"), argv[1:]
    if name not in commands:
        print(f"python -m benchmarks: no subcommand {argv[0]!r}; the subcommands are {', '.join(commands)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__package__ or 'benchmarks'}.{name}")
    sys.argv = [f"python -m benchmarks {name}", *rest]  # argparse names the program after argv[0]; a main() that
    takes_argv = bool(inspect.signature(module.main).parameters)  # takes no argv reads sys.argv
    return (module.main(rest) if takes_argv else module.main()) or 0


if __name__ == "__main__":
    raise SystemExit(main())
