"""User-facing errors.

A `LorafitError` is a mistake in the user's input (a path, a field, a file). The CLI prints its
message as one line and exits non-zero; library callers can catch it. Programming errors stay
ordinary exceptions with tracebacks.
"""


class LorafitError(ValueError):
    """A problem with the user's input; the message names the file/field and what to do."""


class AdapterError(LorafitError):
    """An adapter file or config does not fit the model it is loaded into."""


class BaseMismatch(AdapterError):
    """An adapter's weights do not fit the model's modules: it was trained on another base model."""
