"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class VlkdError(Exception):
    """Bad input or an unusable environment: what is wrong, where, and what to do, in one line."""


def first_line(err: BaseException) -> str:
    """An exception's first non-empty line (at most 200 characters), for a one-line message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:200]
