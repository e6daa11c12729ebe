"""The one exception the runtime raises for bad input or a bad model folder."""


class SdonnxError(ValueError):
    """Bad input or a bad model folder, explained in one line for the user."""
