"""The one exception type users see.

`LmforgeError` carries a message that names the problem in one line. The CLI prints it as
`error: <message>` and exits non-zero; the server will map it to OpenAI's error shape. Library
code raises it for bad input (unknown model, corrupt file, invalid option) so that callers never
have to parse tracebacks.
"""

from __future__ import annotations


class LmforgeError(Exception):
    """Bad input or an unusable artifact, described in one line."""


class ModelNotFoundError(LmforgeError):
    """A model name, directory or file that does not resolve."""


class CorruptArtifactError(LmforgeError):
    """A file that exists but cannot be read as what it claims to be."""
