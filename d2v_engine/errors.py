"""Errors a user causes and can fix.

They are printed as one sentence that says what to do, never as a traceback: the entry points
(`pretrain.py`, `d2v`) catch `UserError` and exit with status 2.
"""


class UserError(Exception):
    """Bad input from the user (config, data, command line): the message is the whole report."""
