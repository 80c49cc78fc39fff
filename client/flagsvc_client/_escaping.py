"""Text from elsewhere shown safely on one line: in flagctl's output and in flagsvc's text logs.

Control characters (C0, DEL, C1), line and paragraph separators, and the Unicode bidi
overrides and isolates (which reorder what a terminal or viewer shows) become visible
escapes: ``\\n``, ``\\r``, ``\\t``, ``\\x1b``, ``\\u202e``. Everything else is left as it is.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: str) -> str:
    """``text`` with every control, separator and bidi character escaped: one line, shown in order."""
    return _UNSAFE.sub(_escape, text)
