"""
What a channel name may be, and how it is written into SQL.

PostgreSQL identifiers are at most 63 bytes (NAMEDATALEN - 1).  C{pg_notify} refuses longer names,
but C{LISTEN} silently truncates them, so a 64-byte channel would be LISTENed under another name and
never receive anything, and two long names could collide: such names are refused outright.
"""

from __future__ import annotations

import json

__all__ = ["ChannelNameError", "check_channel_name", "quote_ident", "show_channel"]

MAX_CHANNEL_BYTES = 63


class ChannelNameError(ValueError):
    """The text says, in one line, why the name cannot be a channel."""


def show_channel(name: str) -> str:
    """
    A channel name quoted for a one-line message: JSON escaping keeps control characters
    (CR, LF, NUL) out of HTTP reason lines and logs while leaving ordinary Unicode readable.
    """
    text = json.dumps(name, ensure_ascii=False)
    # A lone surrogate (from a JSON "\ud800" escape) cannot be written as UTF-8: escape it.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 80 else text[:76] + '..."'


def check_channel_name(name: str) -> str:
    """Return C{name} if it is a usable channel name, else raise L{ChannelNameError}."""
    if "\x00" in name:
        raise ChannelNameError(f"channel {show_channel(name)} contains a NUL character")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ChannelNameError(f"channel {show_channel(name)} is not valid UTF-8") from None
    if size == 0:
        raise ChannelNameError("channel name is empty")
    if size > MAX_CHANNEL_BYTES:
        raise ChannelNameError(
            f"channel {show_channel(name)} is {size} bytes long; the limit is {MAX_CHANNEL_BYTES}"
        )
    return name


def quote_ident(name: str) -> str:
    """A double-quoted SQL identifier (C{"} doubled), for C{LISTEN} / C{UNLISTEN}."""
    return '"' + name.replace('"', '""') + '"'
