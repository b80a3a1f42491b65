"""Names on the wire and how each is checked: block ids, register names, decimal header
values; and the one way a client makes a new block id."""

from __future__ import annotations

import os
import re

BLOCK_ID_LEN = 32  # lowercase hex characters: 128 bits
_BLOCK_ID_RE = re.compile(r"[0-9a-f]{32}\Z")
_REGISTER_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")
REGISTER_NAME_RULE = "[a-z0-9][a-z0-9._-]{0,63}"  # _REGISTER_RE, for messages

MAX_GENERATION = (1 << 63) - 1  # register generations above are refused (400)
MAX_DIGITS = 20  # a decimal header value longer than this is refused (400)

# The first 8 hex digits of every block id this process creates (the other 24 are random):
# a mount's sweep for leftover blocks (fusefs.journal) never touches what its own process
# uploaded. Servers give the tag no meaning; to them an id is 32 hex digits.
PROCESS_TAG = os.urandom(4).hex()


def new_block_id() -> str:
    """A fresh block id, tagged with this process. Blocks are immutable, so every write
    gets a new one."""
    return PROCESS_TAG + os.urandom((BLOCK_ID_LEN - len(PROCESS_TAG)) // 2).hex()


def is_block_id(value: str) -> bool:
    return bool(_BLOCK_ID_RE.match(value))


def is_register_name(value: str) -> bool:
    return bool(_REGISTER_RE.match(value))


def is_number(text: str) -> bool:
    """ASCII decimal digits only, at most MAX_DIGITS of them (int() of longer strings is
    slow or refused, and no header value of ours needs more)."""
    return 0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit()


def is_generation(text: str) -> bool:
    """A register generation as a header carries it: decimal, at most MAX_GENERATION."""
    return is_number(text) and int(text) <= MAX_GENERATION
