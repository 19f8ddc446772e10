"""The error every backend module raises when the chosen backend cannot run here."""


class BackendUnavailable(Exception):
    """The chosen backend cannot run here; the message says why and what to do."""
