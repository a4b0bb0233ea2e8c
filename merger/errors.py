"""The merger's closed set of errors: each message names the file, tensor or field at fault."""


class MergeError(Exception):
    """An input, option or artifact the merger refuses."""


class VerifyError(MergeError):
    """An artifact whose files do not match its manifest."""
