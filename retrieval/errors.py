"""Errors a user can act on; the CLI prints their message instead of a traceback."""


class MedsearchError(Exception):
    """Base class: the message says what went wrong and what to do."""


class ModelUnavailableError(MedsearchError):
    """The checkpoint cannot be loaded (missing, gated, offline, not a SigLIP)."""


class StoreError(MedsearchError):
    """The store is missing, damaged or belongs to another model."""


class InputError(MedsearchError):
    """A file or argument cannot be used; the message names it."""
