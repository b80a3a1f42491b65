"""fusefs block server: stores immutable, checksummed blocks and a few registers.

It never imports `fusefs`. Its wire contract, `blockserver.protocol`, is the one module
that clients import too (fusefs.transport builds requests with it, `api` checks them);
the contract imports nothing else of this package.
"""

__version__ = "0.1.0"
