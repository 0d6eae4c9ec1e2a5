"""User-facing errors. The command line prints them as one line and exits non-zero."""


class AtlasregError(Exception):
    """Bad input or configuration, with a message naming the file and the problem."""

    def __init__(self, message: str, path: object | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
