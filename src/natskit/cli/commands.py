"""The sub-commands of ``natskit``. Each returns a process exit code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from natskit.app import App
from natskit.connection import (
    SECURITY_ENV,
    ConnectOptions,
    connect,
    options_with_security,
    servers_from_env,
    split_servers,
)
from natskit.errors import ConnectError, NatskitError, ServerError

__all__ = ["demo", "pub", "req", "run", "server", "sub"]

STATE_DIR = Path(".natskit")
URL_FILE = STATE_DIR / "server.url"


def fail(message: str, code: int = 1) -> int:
    print(f"natskit: {message}", file=sys.stderr)
    return code


# -- target loading -------------------------------------------------------------------


def load_app(target: str) -> App:
    """Import ``module:attribute`` and return the App it names (or a factory's App)."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise LookupError(f"target {target!r} must look like 'module:attribute'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise LookupError(f"cannot import module {module_name!r}: {exc}") from None
        raise
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise LookupError(f"module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, App):
        obj = obj()
    if not isinstance(obj, App):
        raise LookupError(f"{target!r} is a {type(obj).__name__}, not a natskit.App")
    return obj


# -- servers --------------------------------------------------------------------------


def given_servers(option: str | None) -> list[str]:
    """``--server``, else ``NATS_URL``, else nothing."""
    if option:
        return split_servers(option)
    return servers_from_env()


def debug_servers(option: str | None) -> list[str]:
    """For pub/sub/req: given servers, else the embedded server of ``natskit run``."""
    servers = given_servers(option)
    if servers:
        return servers
    if URL_FILE.exists():
        return split_servers(URL_FILE.read_text().strip())
    return ["nats://127.0.0.1:4222"]


@contextlib.contextmanager
def embedded_server(store_dir: str | None, *, announce: bool = True) -> Iterator[str]:
    """Start an embedded nats-server for the duration of the block; yield its URL."""
    from natskit.server import EmbeddedServer, ServerOptions

    store = Path(store_dir) if store_dir else STATE_DIR / "store"
    store.mkdir(parents=True, exist_ok=True)
    srv = EmbeddedServer(ServerOptions(store_dir=store.resolve()))
    srv.start()
    STATE_DIR.mkdir(exist_ok=True)
    URL_FILE.write_text(srv.url)
    if announce:
        print(
            f"natskit: embedded nats-server at {srv.url}, JetStream data in {store}, "
            f"log {srv.log_path}",
            file=sys.stderr,
        )
    try:
        yield srv.url
    finally:
        with contextlib.suppress(FileNotFoundError):
            if URL_FILE.read_text() == srv.url:
                URL_FILE.unlink()
        srv.stop()


# -- run ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        return fail(f"--workers must be >= 1, got {args.workers}", 2)
    try:
        app = load_app(args.target)
    except LookupError as exc:
        return fail(str(exc), 2)
    if args.drain_timeout is not None:
        app.drain_timeout = args.drain_timeout
    try:
        app.connect_options = options_with_security(
            app.connect_options, given=security_flags(args)
        )
    except ValueError as exc:
        return fail(str(exc), 2)
    app.security_from_env = False  # flags and environment are applied above
    servers = given_servers(args.server)
    try:
        if servers:
            return _run_with(app, args, servers)
        with embedded_server(args.store_dir) as url:
            return _run_with(app, args, [url])
    except ServerError as exc:
        return fail(str(exc))


def _run_with(app: App, args: argparse.Namespace, servers: list[str]) -> int:
    if args.workers == 1:
        try:
            asyncio.run(_serve(app, args, servers))
        except ConnectError as exc:
            return fail(str(exc))
        except KeyboardInterrupt:
            return 130
        return 0
    return _run_workers(args, servers)


async def _serve(app: App, args: argparse.Namespace, servers: list[str]) -> None:
    metrics_port = getattr(args, "metrics_port", None)
    if metrics_port is not None:
        from natskit.observability import serve_metrics

        serve_metrics(app, metrics_port, args.metrics_host)
    port = getattr(args, "health_port", None)
    if port is None:
        await app.run(servers)
        return
    from natskit.discovery.probes import run_with_probes

    await run_with_probes(app, servers, host=args.health_host, port=port)


def security_flags(args: argparse.Namespace) -> dict[str, str | None]:
    """The credential and TLS flags, keyed as ``options_with_security`` expects."""
    return {
        "creds_file": getattr(args, "creds", None),
        "nkey_seed_file": getattr(args, "nkey", None),
        "token": getattr(args, "token", None),
        "user": getattr(args, "user", None),
        "password": getattr(args, "password", None),
        "ca_file": getattr(args, "tls_ca", None),
        "cert_file": getattr(args, "tls_cert", None),
        "key_file": getattr(args, "tls_key", None),
    }


def security_env(args: argparse.Namespace) -> dict[str, str]:
    """The given flags as the environment variables that stand for them.

    When a flag names credentials, the other credential variables are blanked, so a
    worker does not see two kinds of credentials (flags win over the environment).
    """
    given = {k: v for k, v in security_flags(args).items() if v}
    env = {SECURITY_ENV[k]: v for k, v in given.items()}
    auth = ("token", "user", "nkey_seed_file", "creds_file")
    if any(k in given for k in auth):
        for key in auth:
            env.setdefault(SECURITY_ENV[key], "")
    return env


def _run_workers(args: argparse.Namespace, servers: list[str]) -> int:
    command = [sys.executable, "-m", "natskit", "--log-level", args.log_level]
    command += ["--log-format", args.log_format, "run", args.target]
    command += ["--workers", "1"]
    if args.drain_timeout is not None:
        command += ["--drain-timeout", str(args.drain_timeout)]
    port = getattr(args, "health_port", None)
    # Servers (URLs may hold user:password@) and credentials reach the workers through
    # their environment, never their argv.
    env = {**os.environ, **security_env(args), "NATS_URL": ",".join(servers)}
    children = []
    for i in range(args.workers):
        health = [] if port is None else ["--health-port", str(port + i)]
        health += ["--health-host", args.health_host] if health else []
        if args.metrics_port is not None:
            health += ["--metrics-port", str(args.metrics_port + i)]
            health += ["--metrics-host", args.metrics_host]
        children.append(subprocess.Popen(command + health, env=env))
    print(
        f"natskit: {len(children)} workers: pids {' '.join(str(c.pid) for c in children)}",
        file=sys.stderr,
    )

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return max((abs(code) for code in codes), default=0)


# -- server ---------------------------------------------------------------------------


def server(args: argparse.Namespace) -> int:
    from natskit.server import EmbeddedServer, LocalCluster, ServerOptions

    if args.cluster < 1:
        return fail(f"--cluster must be >= 1, got {args.cluster}", 2)
    options = ServerOptions(
        port=args.port,
        store_dir=Path(args.store_dir).resolve() if args.store_dir else None,
        sync_always=not args.no_sync,
    )
    try:
        if args.cluster == 1:
            with EmbeddedServer(options) as srv:
                print(f"nats-server running: {srv.url}")
                print(f"  JetStream data: {srv.store_dir}\n  log: {srv.log_path}")
                print("Ctrl-C to stop.", flush=True)
                _wait_for_signal()
        else:
            with LocalCluster(args.cluster, options=options) as cluster:
                print(f"{args.cluster}-node cluster running: {','.join(cluster.urls)}")
                for node in cluster.nodes:
                    print(f"  {node.url}  data {node.store_dir}  log {node.log_path}")
                print("Ctrl-C to stop.", flush=True)
                _wait_for_signal()
    except ServerError as exc:
        return fail(str(exc))
    return 0


def _wait_for_signal() -> None:
    received: list[int] = []

    def note(signum: int, _frame: object) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not received:
            signal.pause()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- pub / sub / req ------------------------------------------------------------------


def parse_headers(pairs: list[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"header {pair!r} must look like Name=Value")
        headers[name.strip()] = value
    return headers


def _payload(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _debug(args: argparse.Namespace, work: Any) -> int:
    servers = debug_servers(args.server)
    try:
        options = options_with_security(
            ConnectOptions(
                servers=tuple(servers), name="natskit-cli", first_connect_timeout=5.0
            ),
            given=security_flags(args),
        )
        result: int = asyncio.run(work(options))
    except (ConnectError, ValueError, NatskitError) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
    return result


def pub(args: argparse.Namespace) -> int:
    async def work(options: ConnectOptions) -> int:
        app = App("natskit-cli", connection=options)
        app.security_from_env = False  # _debug resolved flags and environment
        headers = parse_headers(args.header)
        await app.start()
        try:
            for _ in range(args.count):
                await app.publish(args.subject, _payload(args.data), headers=headers)
            await app.flush()
        finally:
            await app.stop()
        print(f"published {args.count} message(s) on {args.subject}")
        return 0

    return _debug(args, work)


def sub(args: argparse.Namespace) -> int:
    from natskit.subjects import validate_pattern

    try:
        validate_pattern(args.subject)
    except ValueError as exc:
        return fail(str(exc), 2)

    async def work(options: ConnectOptions) -> int:
        nc = await connect(options)
        seen = 0
        done = asyncio.Event()

        async def show(msg: Any) -> None:
            nonlocal seen
            seen += 1
            stamp = time.strftime("%H:%M:%S")
            print(f"[{stamp}] #{seen} {msg.subject} ({len(msg.data)} bytes)")
            for name, value in (msg.headers or {}).items():
                print(f"  {name}: {value}")
            print(f"  {msg.data.decode('utf-8', 'replace')}", flush=True)
            if args.count and seen >= args.count:
                done.set()

        await nc.subscribe(args.subject, queue=args.queue or "", cb=show)
        await nc.flush()
        print(
            f"listening on {args.subject} (Ctrl-C to stop)", file=sys.stderr, flush=True
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        await done.wait()
        await nc.drain()
        return 0

    return _debug(args, work)


def req(args: argparse.Namespace) -> int:
    async def work(options: ConnectOptions) -> int:
        import nats.errors

        from natskit.codec import CONTENT_TYPE, encode
        from natskit.subjects import validate_subject

        validate_subject(args.subject)
        nc = await connect(options)
        data, ctype = encode(_payload(args.data))
        headers = parse_headers(args.header)
        if ctype:
            headers[CONTENT_TYPE] = ctype
        try:
            reply = await nc.request(
                args.subject, data, timeout=args.timeout, headers=headers or None
            )
        except nats.errors.NoRespondersError:
            return fail(f"no responders on {args.subject}")
        except nats.errors.TimeoutError:
            return fail(f"no reply on {args.subject} within {args.timeout}s")
        finally:
            await nc.close()
        for name, value in (reply.headers or {}).items():
            print(f"{name}: {value}")
        print(reply.data.decode("utf-8", "replace"))
        return 0

    return _debug(args, work)


# -- demo -----------------------------------------------------------------------------


def demo(args: argparse.Namespace) -> int:
    from natskit.demo.run import DemoOptions, run_demo

    if args.orders < 1 or args.rate <= 0:
        return fail("--orders must be >= 1 and --rate > 0", 2)
    options = DemoOptions(
        orders=args.orders,
        rate=args.rate,
        chaos=args.chaos,
        keep_running=args.keep_running,
        payment_failure_rate=args.payment_failures,
        progress=sys.stderr.isatty(),
    )
    servers = given_servers(args.server)
    try:
        if servers:
            summary = asyncio.run(run_demo(servers, options))
        else:
            # A fresh store per run: the demo's data is not yours to keep.
            with (
                tempfile.TemporaryDirectory(prefix="natskit-demo-store-") as store,
                embedded_server(store, announce=True) as url,
            ):
                summary = asyncio.run(run_demo([url], options))
        return 0 if summary.reconciles else 1
    except (ServerError, ConnectError, TimeoutError) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
