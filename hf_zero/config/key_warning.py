"""``warn_at_key``: a warning about a setting of the user's config file, said once per job and
placed at that setting's line of the file.

Every rank reads the same config, so a warning about it comes from rank 0 alone
(hf_zero/first_rank.py). And it is placed where the user can act on it: Python prints a warning
as ``FILE:LINE: UserWarning: message`` followed by that line of FILE, so with the config file and
the key's line in place of a line of hf_zero's code the user reads, for example,

    ds.json:4: UserWarning: hf_zero accepts but does not apply these keys of ds.json: ...
      "overlap_comm": false,

A config given as a dict (``source`` ``<dict>``) has no lines: ``<dict>:0: UserWarning: ...``.
The warning keeps the category ``UserWarning`` and the module ``hf_zero.config`` for filters
(``-W ignore:::hf_zero.config``), and Python's "said already" rule for identical warnings.
"""

from __future__ import annotations

import os
import re
import warnings

from hf_zero.config.small_file import read_small_text
from hf_zero.first_rank import is_first_rank

_REGISTRY: dict = {}  # the warnings module's "said already" table for these warnings (filter action "default")


def warn_at_key(message: str, source: str | None, key: str) -> None:
    """Warn ``message`` (a ``UserWarning``) on the job's rank 0, at the line of ``source`` (the config
    file) where ``key`` (a dotted path such as ``zero_optimization.overlap_comm``) is written."""
    if not is_first_rank():
        return
    source = source or "<config>"
    warnings.warn_explicit(message, UserWarning, filename=source, lineno=line_of(source, key),
                           module="hf_zero.config", registry=_REGISTRY)


def line_of(source: str, key: str) -> int:
    """The line of the JSON file ``source`` where ``key``'s last part is first written as a key
    (0: not a file, or not found)."""
    if not os.path.isfile(source):
        return 0
    try:
        text = read_small_text(source)
    except ValueError:
        return 0
    found = re.search(r'"%s"\s*:' % re.escape(key.rsplit(".", 1)[-1]), text)
    return text.count("\n", 0, found.start()) + 1 if found else 0
