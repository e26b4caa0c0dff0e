"""The command line: the only place that parses argv, prints and exits.

Exit codes: 0 success; 1 invalid input (one ``path: message`` line per problem on stderr, no
traceback); 2 usage errors. One module per command group; importing them registers their commands.
"""

import gc

from metaformer_lab.cli import latency, ops, search, space, spec, zoo  # noqa: F401  (registers the commands)
from metaformer_lab.cli.common import app


def main() -> None:
    # What exists once the commands are imported (op configs, schemas, the registries) lives until the process
    # ends: moved out of the cyclic collector's generations, it is not scanned again by every collection that a
    # command's many short-lived objects set off (``space size``'s draws run ~7 % faster).
    gc.freeze()
    app()


__all__ = ["app", "main"]
