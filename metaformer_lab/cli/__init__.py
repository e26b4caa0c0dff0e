"""The command line: the only place that parses argv, prints and exits.

Exit codes: 0 success; 1 invalid input (one ``path: message`` line per problem on stderr, no
traceback); 2 usage errors. One module per command group; importing them registers their commands.
"""

from metaformer_lab.cli import latency, ops, search, space, spec, zoo  # noqa: F401  (registers the commands)
from metaformer_lab.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
