"""The wire contract between fusefs clients and block servers (docs/blockserver-api.md).

Everything both sides must agree on lives in this package and only here, and both sides
import it as `blockserver.protocol` (this module re-exports every name below):

- `paths`: the endpoints and their queries, and the builders of request targets;
- `headers`: header names;
- `statuses`: what each status means beyond plain HTTP;
- `ids`: block ids (and the generator a client makes them with), register names, numbers;
- `digests`: the block checksum (xxh3-128) and the body digest signatures cover (SHA-256);
- `keys`: the cluster secret and the read-only key, and how key files are read;
- `signing`: request and response signatures;
- `batch`: the framing of batch bodies;
- `files`: a block file's format and the token by which a client on the server's host
  may read block files itself;
- `units`: sizes as people write them on both command lines.

It imports nothing else of `blockserver` and nothing of `fusefs` (tests/test_layering.py):
the server (`blockserver.api`) checks requests with it and the client (`fusefs.transport`)
builds them with it, so the two meet only here.
"""

from .batch import MAX_BATCH_ITEMS, BatchFormatError, decode_batch, encode_batch
from .digests import (BLAKE3, EMPTY_CHECKSUM, EMPTY_DIGEST, SHA256, SUPPORTED_DIGESTS, checksum,
                      content_digest, digest_algorithm, is_checksum)
from .files import (BLOCK_HEADER, BLOCK_MAGIC, TOKEN_FILE, block_file, open_block_file,
                    read_block_file, read_token)
from .headers import (AUTH_SCHEME, H_AUTHORIZATION, H_CHECKSUM, H_CONTENT_HASH, H_DATE,
                      H_DIGESTS, H_EXPECT_GENERATION, H_FOR_SERVER, H_GENERATION, H_NONCE,
                      H_RESPONSE_SIGNATURE, H_ROLE, H_SERVER_ID)
from .ids import (BLOCK_ID_LEN, MAX_DIGITS, MAX_GENERATION, PROCESS_TAG, REGISTER_NAME_RULE,
                  is_block_id, is_generation, is_number, is_register_name, new_block_id)
from .keys import (MIN_SECRET_LEN, READ_KEY_PREFIX, ROLE_READ, ROLE_WRITE, Credentials,
                   SecretError, derive_read_key, load_credentials, load_secret, role_keys,
                   write_read_key_file)
from .paths import (API_PREFIX, BATCH_CHECK, BATCH_DELETE, BATCH_GET, BATCH_PUT, BLOCKS,
                    DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT, METRICS, Q_AFTER, Q_LIMIT, Q_USE,
                    REGISTERS, STATUS, USE_DATA, USE_METADATA, block_path, listing_path,
                    register_path, split_item)
from .signing import (SIGNATURE_MAX_SKEW, SIGNED_HEADERS, SIGNED_RESPONSE_HEADERS,
                      response_signature, sign_request, signature)
from .statuses import (ALREADY_STORED, BUSY, CHECKSUM_MISMATCH, CONFLICT, CORRUPT, DONE, FULL,
                       MISSING, OK, PUT_OK, READ_ONLY, STORED, TOO_LARGE, UNAUTHENTICATED,
                       UNSIGNED_REFUSALS)
from .units import format_size, parse_size, size_argument

__all__ = [
    # paths
    "API_PREFIX", "STATUS", "BLOCKS", "REGISTERS", "BATCH_PUT", "BATCH_GET", "BATCH_CHECK",
    "BATCH_DELETE", "METRICS", "Q_USE", "USE_METADATA", "USE_DATA", "Q_LIMIT", "Q_AFTER",
    "DEFAULT_LIST_LIMIT", "MAX_LIST_LIMIT", "block_path", "register_path", "listing_path",
    "split_item",
    # headers
    "H_CHECKSUM", "H_GENERATION", "H_EXPECT_GENERATION", "H_SERVER_ID", "H_DATE", "H_NONCE",
    "H_CONTENT_HASH", "H_FOR_SERVER", "H_ROLE", "H_RESPONSE_SIGNATURE", "H_AUTHORIZATION",
    "H_DIGESTS", "AUTH_SCHEME",
    # statuses
    "OK", "STORED", "ALREADY_STORED", "DONE", "UNAUTHENTICATED", "READ_ONLY", "MISSING",
    "CONFLICT", "CORRUPT", "TOO_LARGE", "CHECKSUM_MISMATCH", "BUSY", "FULL", "PUT_OK",
    "UNSIGNED_REFUSALS",
    # ids
    "BLOCK_ID_LEN", "REGISTER_NAME_RULE", "MAX_GENERATION", "MAX_DIGITS", "PROCESS_TAG",
    "new_block_id", "is_block_id", "is_register_name", "is_number", "is_generation",
    # digests
    "checksum", "is_checksum", "content_digest", "EMPTY_CHECKSUM", "EMPTY_DIGEST",
    "SHA256", "BLAKE3", "SUPPORTED_DIGESTS", "digest_algorithm",
    # keys
    "ROLE_WRITE", "ROLE_READ", "READ_KEY_PREFIX", "MIN_SECRET_LEN", "SecretError",
    "Credentials", "derive_read_key", "role_keys", "load_credentials", "load_secret",
    "write_read_key_file",
    # signing
    "SIGNATURE_MAX_SKEW", "SIGNED_HEADERS", "SIGNED_RESPONSE_HEADERS", "signature",
    "sign_request", "response_signature",
    # batch
    "MAX_BATCH_ITEMS", "encode_batch", "decode_batch", "BatchFormatError",
    # files
    "BLOCK_MAGIC", "BLOCK_HEADER", "TOKEN_FILE", "block_file", "open_block_file",
    "read_block_file", "read_token",
    # units
    "parse_size", "format_size", "size_argument",
]
