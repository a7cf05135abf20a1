"""Sub-commands of ``python -m fpe_lab.run``: one module per command, each with
``add_parser(subparsers)`` registering its arguments and handler (``set_defaults(handler=...)``).

Handlers raise :class:`CLIError` for bad input; ``fpe_lab.run`` prints it as one line and exits 2.
"""


class CLIError(Exception):
    """Bad command-line input: printed as ``error: <message>`` with exit code 2, no traceback."""
