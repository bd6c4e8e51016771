"""`python -m pyengine.bench [model|kernels|serve|vision] [options]`.

The default subcommand is the model benchmark (pyengine.bench.model). ``kernels``
(op microbenchmarks), ``serve`` (the HTTP server benchmark) and ``vision`` (a
vision-language classifier on prompts with images) are imported only
when asked for, so a build without them still runs the model benchmark.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {"model": "pyengine.bench.model", "kernels": "pyengine.bench.kernels",
               "serve": "pyengine.bench.serve", "vision": "pyengine.bench.vision"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = "model"
    if argv and not argv[0].startswith("-"):
        name = argv.pop(0)
        if name not in SUBCOMMANDS:
            print(f"python -m pyengine.bench: unknown subcommand {name!r}; expected one of "
                  f"{', '.join(SUBCOMMANDS)} (or options of the default model benchmark)", file=sys.stderr)
            return 2
    module = SUBCOMMANDS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise  # the module exists but something it imports is missing: show the real error
        print(f"python -m pyengine.bench {name}: not available in this build ({module} is missing)",
              file=sys.stderr)
        return 2
    return mod.main(argv) or 0


if __name__ == "__main__":
    sys.exit(main())
