"""The product's one error base class.

Every error a user can meet (a bad file, flag, dataset, checkpoint, adapter or model folder) is an
`MlxSdError` whose message names the file or value and says what to do. Each CLI catches this one
class, prints the message once and exits with status 2; anything else is a bug and keeps its traceback.
"""


class MlxSdError(Exception):
    """Base of every user-facing error (the message is complete as it stands)."""
