"""Errors the model side raises for what a user can fix; each message is one line the CLI prints as
``Error: <message>``. Bad values (a prompt, a setting) are :class:`registry.errors.ValidationError`, shared with
the storage side; this module adds what only the model side can get wrong. It imports nothing heavy, so the
admin CLI can name these without loading torch.
"""


class ModelLoadError(Exception):
    """The model could not be found or loaded; the message says what to do."""
