"""The one exception type for bad user input (files, config keys, arguments).

The CLI turns it into a single `error: ...` line on stderr and exit code 2; library users can
catch it. Messages name the file/key and what is wrong, on one line.
"""


class UserError(Exception):
    """Bad input from the user: a file, a config key, an argument."""
