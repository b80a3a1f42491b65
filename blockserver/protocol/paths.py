"""The endpoints of the contract and their queries, spelled once: the client builds its
request targets with these functions and the server's router matches the same constants.

Every endpoint but the metrics lives under API_PREFIX. Items of a collection are its path,
a slash and the item's name: `/v1/blocks/{id}`, `/v1/registers/{name}`.
"""

from __future__ import annotations

API_PREFIX = "/v1"

STATUS = API_PREFIX + "/status"  # GET: the server's id, space and limits
BLOCKS = API_PREFIX + "/blocks"  # GET: the listing; BLOCKS/{id}: one block
REGISTERS = API_PREFIX + "/registers"  # REGISTERS/{name}: one register
BATCH_PUT = API_PREFIX + "/batch/put"
BATCH_GET = API_PREFIX + "/batch/get"
BATCH_CHECK = API_PREFIX + "/batch/check"
BATCH_DELETE = API_PREFIX + "/batch/delete"
METRICS = "/metrics"  # GET: Prometheus text (outside the API prefix, where scrapers look)

# PUT BLOCKS/{id}?use=metadata: a journal segment or checkpoint, which may use the space
# a server keeps back from file data. Anything else (or no query) is file data.
Q_USE = "use"
USE_METADATA = "metadata"
USE_DATA = "data"

# GET BLOCKS?limit=N&after=ID: one page of the listing, in id order.
Q_LIMIT = "limit"
Q_AFTER = "after"
DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10000


def block_path(block_id: str, metadata: bool = False) -> str:
    """The target of one block; `metadata` marks a PUT of a journal block."""
    query = f"?{Q_USE}={USE_METADATA}" if metadata else ""
    return f"{BLOCKS}/{block_id}{query}"


def register_path(name: str) -> str:
    return f"{REGISTERS}/{name}"


def listing_path(after: str = "", limit: int = DEFAULT_LIST_LIMIT) -> str:
    """The target of one page of the listing: ids after `after`, at most `limit` of them."""
    return f"{BLOCKS}?{Q_LIMIT}={limit}" + (f"&{Q_AFTER}={after}" if after else "")


def split_item(path: str) -> tuple[str, str]:
    """(collection, name) of a path under API_PREFIX: `/v1/blocks/ID` -> (BLOCKS, "ID");
    a path with no item has the name "" (`/v1/status` -> (STATUS, ""))."""
    kind, _, name = path[len(API_PREFIX) + 1:].partition("/")
    return f"{API_PREFIX}/{kind}", name

