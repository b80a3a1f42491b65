"""fusefs block server: stores immutable, checksummed blocks and a few registers.

It never imports `fusefs`; the client imports `blockserver.protocol` for the wire contract.
"""

__version__ = "0.1.0"
