"""Errors raised by the registry.

Every message is one human-readable line: the CLI prints it as ``Error: <message>``.
Catch :class:`RegistryError` to handle all of them.
"""


class RegistryError(Exception):
    """Base class for every error the registry raises."""


class EditNotFound(RegistryError, KeyError):
    """No edit with the requested id exists."""

    def __str__(self) -> str:
        # KeyError would wrap the message in quotes.
        return str(self.args[0]) if self.args else ""


class InvalidTransition(RegistryError):
    """The edit's status does not allow the requested change (e.g. rollback twice)."""


class ReadOnlyError(RegistryError):
    """A write was attempted on a registry opened read-only."""


class SchemaError(RegistryError):
    """The path is not a registry, or its schema version is not supported."""


class ConfigMismatch(RegistryError):
    """The registry belongs to another model or configuration."""


class CorruptEdit(RegistryError):
    """A stored key or adapter fails its checksum, shape, dtype or finiteness check."""


class BundleError(RegistryError):
    """An export bundle is malformed or belongs to another model."""


class ValidationError(RegistryError, ValueError):
    """An argument has a bad value (wrong key dimension, non-finite tensor, ...)."""
