"""User-facing errors.

Anything the user can fix (a bad file, a bad flag) raises :class:`InputError`. The CLI turns it
into one line on stderr and exit code 2, without a traceback.
"""


class InputError(Exception):
    """Bad user input: a file that cannot be read or parsed, an invalid option.

    The message names the file (and line, where there is one) and what is wrong.
    """

    def __init__(self, message, path=None, line=None):
        self.path = None if path is None else str(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = self.path if line is None else f"{self.path}:{line}"
            where += ": "
        super().__init__(where + message)
