"""The one error type of model loading: its message names the config key, the path and the fix."""


class ModelLoadError(Exception):
    """The model could not be found, read or is not a supported architecture."""
