"""The names of the headers of the contract, in one place. Both sides spell a header only
through these constants."""

H_CHECKSUM = "X-Fusefs-Checksum"  # xxh3-128 of a block's bytes, 32 lowercase hex
H_GENERATION = "X-Fusefs-Generation"  # register generation (decimal)
H_EXPECT_GENERATION = "X-Fusefs-Expect-Generation"  # register compare-and-swap (decimal)
H_SERVER_ID = "X-Fusefs-Server-Id"  # on every response: the server's stable id
H_DATE = "X-Fusefs-Date"  # signing: unix seconds
H_NONCE = "X-Fusefs-Nonce"  # signing: random, never reused within the skew window
H_CONTENT_HASH = "X-Fusefs-Content-Hash"  # signing: digest of the whole request body
H_FOR_SERVER = "X-Fusefs-For-Server"  # signing: the id of the server the request is for
H_ROLE = "X-Fusefs-Role"  # signing: which key signed: "write" (the secret) or "read"
H_RESPONSE_SIGNATURE = "X-Fusefs-Response-Signature"  # the server's HMAC over its answer
H_DIGESTS = "X-Fusefs-Digests"  # on every response: the body digests the server takes
H_AUTHORIZATION = "Authorization"  # signing: "<AUTH_SCHEME> <hex HMAC>"
AUTH_SCHEME = "FUSEFS-HMAC-SHA256"
