"""`blockserver` command line, and the one place a server is assembled and torn down."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import ssl
import sys
import threading

from . import __version__, protocol
from .api import Api, ApiConfig
from .http11 import Limits, Server
from .metrics import Metrics
from .protocol import size_argument
from .store import BlockStore

log = logging.getLogger("blockserver")

DESCRIPTION = """\
Serve immutable, checksummed blocks over HTTP/1.1 for fusefs clients.

Every block is verified against its xxh3-128 checksum when it arrives and every time it is
read; a stored copy that fails is moved to DATA/quarantine/ and never served. A block is
acknowledged only once it is durable on disk. See docs/blockserver-api.md for the protocol.
"""

EPILOG = """\
examples:
  blockserver serve --data /srv/blocks
  blockserver serve --data /srv/blocks --listen 0.0.0.0:7001 --secret-file /etc/fusefs/secret \
      --tls-cert /etc/fusefs/cert.pem --tls-key /etc/fusefs/key.pem
  blockserver serve --data /tmp/b --listen 127.0.0.1:0     # pick a free port; the URL is printed

The server prints `serving URL` on standard output once it accepts requests, logs one line
per problem on standard error, and stops cleanly on SIGTERM or Ctrl-C.
"""


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:7001)")
    if int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a port is 0 to 65535 (0 picks a free one)")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockserver", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"blockserver {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="store and serve blocks from a data directory",
                           description=DESCRIPTION, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--data", required=True, metavar="DIR",
                       help="data directory (created if missing)")
    serve.add_argument("--listen", type=_listen_address, default=("127.0.0.1", 7001),
                       metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:7001; "
                       "port 0 picks a free one)")
    serve.add_argument("--secret-file", metavar="F", help="shared cluster secret: every request "
                       "must then be signed with it (HMAC-SHA256)")
    serve.add_argument("--insecure", action="store_true",
                       help="allow listening beyond loopback without --secret-file (anyone "
                       "who reaches the port can then read, write and delete every block)")
    serve.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate")
    serve.add_argument("--tls-key", metavar="PEM", help="private key for --tls-cert")
    serve.add_argument("--max-block-size", type=size_argument, default="16MiB", metavar="SIZE",
                       help="largest block accepted (default 16MiB; larger: 413)")
    serve.add_argument("--max-batch-size", type=size_argument, default="64MiB", metavar="SIZE",
                       help="largest batch request or response body (default 64MiB)")
    serve.add_argument("--reserve", type=size_argument, default=None, metavar="SIZE",
                       help="free space file data may not use (507 beyond it); journal "
                       "segments and checkpoints may, so removals can still be recorded "
                       "on a full disk (default: 1%% of the disk, at most 64MiB)")
    serve.add_argument("--max-connections", type=int, default=256, metavar="N",
                       help="connections served at once (default 256; more get 503); a "
                       "quarter of them is kept for clients that sent a signed request")
    serve.add_argument("--max-unauthenticated-per-peer", type=int, default=64, metavar="N",
                       help="connections one address may hold before its first signed "
                       "request (default 64; more get 503)")
    serve.add_argument("--max-body-memory", type=size_argument, default="1GiB", metavar="SIZE",
                       help="request bodies held in memory at once, over all connections "
                       "(default 1GiB; beyond it: 503)")
    serve.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                       help="seconds a client has to send a request head (default 10)")
    serve.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                       help="seconds allowed for a body, plus size / --min-rate (default 30)")
    serve.add_argument("--min-rate", type=size_argument, default="1MiB", metavar="SIZE",
                       help="slowest transfer rate tolerated per second (default 1MiB)")
    serve.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                       help="seconds an idle keep-alive connection stays open (default 60)")
    serve.add_argument("--public-metrics", action="store_true",
                       help="serve /metrics without a signature (for Prometheus)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    return parser


def _tls_context(args) -> ssl.SSLContext | None:
    if not args.tls_cert and not args.tls_key:
        return None
    if not (args.tls_cert and args.tls_key):
        raise SystemExit("blockserver: --tls-cert and --tls-key go together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise SystemExit(f"blockserver: cannot load TLS certificate/key: {e}") from None
    return context


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_exposure(args) -> None:
    """Refuse to serve beyond loopback without a secret, unless told --insecure."""
    host = args.listen[0]
    if args.secret_file or _is_loopback(host):
        return
    if not args.insecure:
        raise SystemExit(
            f"blockserver: refusing to listen on {host} without --secret-file: anyone who "
            "can reach it could read, overwrite and delete every block. Give the cluster "
            "secret with --secret-file F (and TLS with --tls-cert/--tls-key), listen on "
            "127.0.0.1, or pass --insecure on a network you trust completely.")
    log.warning("listening on %s WITHOUT authentication (--insecure): anyone who reaches "
                "this port can read, write and delete every block", host)


def _limits(args) -> Limits:
    return Limits(header_timeout=args.header_timeout, idle_timeout=args.idle_timeout,
                  body_timeout=args.body_timeout, min_rate=max(1, args.min_rate),
                  max_connections=args.max_connections,
                  max_body_memory=args.max_body_memory,
                  max_strangers_per_peer=max(1, args.max_unauthenticated_per_peer),
                  reserved_slots=args.max_connections // 4)


def serve(args) -> int:
    _check_exposure(args)
    secret = None
    if args.secret_file:
        try:
            secret = protocol.load_secret(args.secret_file)
        except protocol.SecretError as e:
            raise SystemExit(f"blockserver: {e}") from None
    tls = _tls_context(args)
    try:
        store = BlockStore(args.data, reserve_bytes=_reserve(args))
    except OSError as e:
        raise SystemExit(f"blockserver: cannot use data directory {args.data}: {e}") from None
    metrics = Metrics()
    api = Api(store, ApiConfig(max_block_size=args.max_block_size,
                               max_batch_bytes=args.max_batch_size, secret=secret,
                               public_metrics=args.public_metrics,
                               access_log=args.access_log), metrics)
    try:
        server = Server(args.listen, api, _limits(args), ssl_context=tls,
                        on_cut=metrics.connection_closed,
                        response_headers={protocol.H_SERVER_ID: store.server_id,
                                          protocol.H_DIGESTS: ",".join(protocol.SUPPORTED_DIGESTS),
                                          "Server": f"fusefs-blockserver/{__version__}"})
    except OSError as e:
        raise SystemExit(f"blockserver: cannot listen on {args.listen[0]}:{args.listen[1]}: "
                         f"{e.strerror} (is another server using that port?)") from None
    api.open_connections = lambda: server.open_connections
    if secret is not None:
        api.nonces.wait_for_floor()  # requests signed before this start are refused (replays)

    def on_signal(signum, frame):  # no lock, no logging: see Server.stop
        server.stop(f"received {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = server.address
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if tls else "http"
    print(f"serving {scheme}://{shown}:{port}", flush=True)
    log.info("blockserver %s serving %s://%s:%d from %s (server id %s, auth %s)", __version__,
             scheme, shown, port, store.root, store.server_id, "on" if secret else "off")
    server.serve_forever()
    # Stopped: later signals change nothing, and must not kill the interpreter on its way
    # out (it puts back the default action of every signal it handled, but not of an
    # ignored one), which made a server that got a burst of SIGTERMs exit with -15.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    log.info("stopped")
    return 0


def _reserve(args) -> int:
    """--reserve, or 1% of the data directory's disk, at most 64 MiB."""
    if args.reserve is not None:
        return args.reserve
    os.makedirs(args.data, exist_ok=True)
    st = os.statvfs(args.data)
    return min(64 << 20, st.f_blocks * st.f_frsize // 100)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threading.current_thread().name = "main"
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
