"""What the statuses of the contract mean, beyond plain HTTP. The server answers with
these; the client turns each into one of its exceptions. A batch item carries the status
its single-block request would have had."""

OK = 200  # the answer asked for (a batch item: this one is here)
STORED = 201  # PUT of a block: stored now
ALREADY_STORED = 200  # PUT of a block: the same id and checksum were there already
DONE = 204  # DELETE of a block (whether or not it existed); PUT of a register
UNAUTHENTICATED = 401  # not signed, badly signed, stale, replayed or for another server
READ_ONLY = 403  # signed with the read-only key, for something that writes
MISSING = 404  # no such block or register (or endpoint)
CONFLICT = 409  # a block stored with another checksum; a register's generation refused
CORRUPT = 410  # the stored copy failed verification and was quarantined
TOO_LARGE = 413  # a body over the limit; a batch item that did not fit in this answer
CHECKSUM_MISMATCH = 422  # the bytes received do not match their checksum; nothing stored
BUSY = 503  # too many connections, nonces or bodies in memory: try again
FULL = 507  # no space for file data (journal blocks may still use the reserve)
PUT_OK = (ALREADY_STORED, STORED)  # a block PUT (or batch put item) that succeeded

# Statuses a server may give before it has checked a signature, hence unsigned. A forged
# one can only make a request fail, as dropping it could; every other answer is signed.
UNSIGNED_REFUSALS = frozenset({400, 401, 405, 411, 413, 414, 431, 501, 503, 505})
