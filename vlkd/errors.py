"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class VlkdError(Exception):
    """Bad input or an unusable environment: what is wrong, where, and what to do, in one line."""
