"""The one exception type users see: a message that names what is wrong and how to fix it."""


class MagmaError(Exception):
    """Bad config or bad input, raised before anything is written."""
