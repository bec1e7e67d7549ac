"""User errors: things the user can fix. The CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input or environment. The message says what is wrong and what to do."""
