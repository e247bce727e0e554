"""The one exception type users see: bad input, reported as a single line with exit code 2."""


class QkitError(Exception):
    """Bad input or an unusable artifact; the CLI prints ``error: <message>`` and exits 2."""
