"""The one error type loading raises; the CLI prints its message without a traceback."""


class ModelLoadError(Exception):
    """A model could not be loaded; `str(e)` is a clear one-line message."""
