"""The ``natskit`` command: run apps, run a server, watch and send messages."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from natskit.cli import commands, logs, services, streams

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="natskit",
        description="Real-time distributed systems on NATS.",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        help="DEBUG, INFO, WARNING or ERROR (default INFO for run and server, else WARNING)",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log line format"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_run(sub)

    server = sub.add_parser(
        "server", help="run an embedded nats-server in the foreground"
    )
    server.add_argument("--cluster", type=int, default=1, help="nodes (default 1)")
    server.add_argument(
        "--port", type=int, default=None, help="client port (default free)"
    )
    server.add_argument("--store-dir", default=None, help="JetStream data directory")
    server.add_argument(
        "--no-sync",
        action="store_true",
        help="let the server fsync on its own schedule (faster, less durable)",
    )
    server.set_defaults(func=commands.server)

    pub = sub.add_parser("pub", help="publish a message")
    pub.add_argument("subject")
    pub.add_argument("data", help="payload text (JSON is sent as JSON)")
    pub.add_argument("--header", "-H", action="append", default=[], help="Name=Value")
    pub.add_argument("--count", type=int, default=1)
    _add_server_option(pub)
    _add_security_options(pub)
    pub.set_defaults(func=commands.pub)

    subc = sub.add_parser("sub", help="print messages on a subject (wildcards allowed)")
    subc.add_argument("subject")
    subc.add_argument("--queue", default=None)
    subc.add_argument("--count", type=int, default=0, help="stop after N messages")
    _add_server_option(subc)
    _add_security_options(subc)
    subc.set_defaults(func=commands.sub)

    req = sub.add_parser("req", help="send a request and print the reply")
    req.add_argument("subject")
    req.add_argument("data")
    req.add_argument("--header", "-H", action="append", default=[], help="Name=Value")
    req.add_argument("--timeout", type=float, default=2.0)
    _add_server_option(req)
    _add_security_options(req)
    req.set_defaults(func=commands.req)

    demo = sub.add_parser(
        "demo", help="run the reference order system and drive orders through it"
    )
    demo.add_argument("--orders", type=int, default=2000, help="orders to send (2000)")
    demo.add_argument(
        "--rate", type=float, default=250.0, help="orders per second (250)"
    )
    demo.add_argument(
        "--chaos",
        action="store_true",
        help="SIGKILL a shipper and a payment instance mid-run, then restart them",
    )
    demo.add_argument(
        "--keep-running", action="store_true", help="leave the system up until Ctrl-C"
    )
    demo.add_argument(
        "--payment-failures",
        type=float,
        default=0.02,
        help="share of charges the payment provider fails (0.02)",
    )
    _add_server_option(demo)
    demo.set_defaults(func=commands.demo)
    streams.add_parsers(sub)
    services.add_parsers(sub)
    return parser


def _add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="run an App: natskit run module:app")
    run.add_argument("target", help="module:attribute naming an App (or a factory)")
    _add_server_option(run)
    _add_security_options(run)
    run.add_argument(
        "--workers", type=int, default=1, help="processes to run (default 1)"
    )
    # Also accepted after the command (natskit run app:app --log-format json); SUPPRESS
    # keeps the subcommand from resetting a value given before it.
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=argparse.SUPPRESS,
        help="log line format (text or json)",
    )
    run.add_argument(
        "--store-dir",
        default=None,
        help="JetStream data of the embedded server (default .natskit/store)",
    )
    run.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="seconds to finish in-flight work",
    )
    run.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="serve HTTP /livez and /readyz on this port (worker i gets PORT+i)",
    )
    run.add_argument(
        "--health-host", default="127.0.0.1", help="address of the health probes"
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics at /metrics on this port (worker i gets PORT+i)",
    )
    run.add_argument(
        "--metrics-host", default="127.0.0.1", help="address of the metrics endpoint"
    )
    run.set_defaults(func=commands.run)


def _add_server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        "-s",
        default=None,
        help="NATS URL(s), comma-separated (default: NATS_URL, else an embedded server)",
    )


def _add_security_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "credentials and TLS",
        "each also read from the environment variable named; a flag wins, then the "
        "environment, then the App's ConnectOptions. Prefer the variables (or files) "
        "for secrets: flags show in the process list.",
    )
    group.add_argument("--creds", metavar="FILE", help="creds file (NATS_CREDS)")
    group.add_argument("--nkey", metavar="FILE", help="NKey seed file (NATS_NKEY)")
    group.add_argument("--token", help="auth token (NATS_TOKEN)")
    group.add_argument("--user", help="user name (NATS_USER)")
    group.add_argument("--password", help="password (NATS_PASSWORD)")
    group.add_argument("--tls-ca", metavar="FILE", help="CA certificates (NATS_CA)")
    group.add_argument(
        "--tls-cert", metavar="FILE", help="client certificate (NATS_CERT)"
    )
    group.add_argument("--tls-key", metavar="FILE", help="client key (NATS_KEY)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.log_level is None:
        # Lifecycle lines matter for long-running commands; the others print results.
        args.log_level = "INFO" if args.command in ("run", "server") else "WARNING"
    logs.configure(args.log_level, args.log_format)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
