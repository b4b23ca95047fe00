"""The base of zotune's own errors: a problem the user can fix (a config, a file, a checkpoint).

The command line prints a :class:`ZotuneError` as one line naming what to fix (``--debug`` or
``ZOTUNE_DEBUG=1`` adds the traceback); any other exception is a bug in zotune or a library and
keeps its traceback. Each concrete error also derives from the built-in type it has always been
(``ConfigError`` is a ``ValueError``, ``CheckpointError`` a ``RuntimeError`` ...), so existing
``except`` clauses still catch it.
"""

from __future__ import annotations


class ZotuneError(Exception):
    """An error in what the user asked for (config, files, checkpoint, data), not a bug."""


class UserFileError(ZotuneError, FileNotFoundError):
    """A file or folder named by the user (a recipe, a checkpoint folder) that does not exist."""
