"""The error types a user's input raises: imported by every room that reads input, importing nothing of ours."""


class InputError(ValueError):
    """Something the user supplied (a data file, a model folder, a checkpoint or run folder) cannot be
    used as it is; the message names the file (and line) and what was expected. The command line
    prints it as one `error: ...` line and exits with status 2, as argparse does for a bad flag."""


class MissingInput(InputError, FileNotFoundError):
    """An input file or folder that is not there."""
