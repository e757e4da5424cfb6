"""Errors the suite raises for bad input. The CLI prints ``str(err)`` as one line and exits 2."""


class DpfplError(Exception):
    """Base class: a problem the user can fix (bad option, missing file, spent budget...)."""


class ConfigError(DpfplError, ValueError):
    """An option has an invalid value; the message names the field and the value."""


class DataError(DpfplError):
    """A dataset is missing, malformed or corrupt; the message names the path and expected layout."""


class BudgetExhausted(DpfplError):
    """A privacy release would exceed the configured (epsilon, delta) budget."""
