class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or unreadable; the message names the path."""
