"""`gateway` command line: serve, migrate, keys, usage, sync, polar setup."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.admin import key_json
from gateway.collector import tune_collector
from gateway.keys import InvalidKeyName, InvalidUserId, check_key_name, check_user_id, issue_key
from gateway.recording import recover_journal
from gateway.settings import ConfigError, Settings, settings_from_env
from gateway.store import Store, create_store
from gateway.store.leases_base import InvalidationKind


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway", description="LLM billing gateway for Claude and Gemini, metered into Polar"
    )
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway (applies migrations first)")
    serve.add_argument("--host", help="overrides GATEWAY_HOST")
    serve.add_argument("--port", type=int, help="overrides GATEWAY_PORT")
    serve.add_argument("--workers", type=int, default=1, help="processes on this machine's cores (default 1)")
    sub.add_parser("migrate", help="apply database migrations")

    keys = sub.add_parser("keys", help="manage user keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="issue a key for a user; prints it once")
    create.add_argument("--user", required=True, help="your app's user id (also the Polar external customer id)")
    create.add_argument("--name", default="", help="a label for the key")
    create.add_argument(
        "--email", help="ensure a Polar customer with this email exists (needs Polar configured: else no key is issued)"
    )
    create.add_argument("--json", action="store_true", help='print {"id","key","user_id"}')
    lst = keys.add_parser("list", help="list keys (never shows the key itself)")
    lst.add_argument("--user")
    lst.add_argument("--json", action="store_true")
    revoke = keys.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")

    usage = sub.add_parser("usage", help="per-meter totals with sync state")
    usage.add_argument("--user")
    usage.add_argument("--json", action="store_true")
    sync = sub.add_parser("sync", help="send every pending event to Polar now, backoffs included")
    sync.add_argument("--retry-failed", action="store_true", help="re-queue parked events first")
    polar = sub.add_parser("polar", help="Polar setup").add_subparsers(dest="polar_command", required=True)
    polar.add_parser("setup", help="create the Polar meters (idempotent)")
    return p


class StoreUnavailable(Exception):
    """The database could not be opened or migrated (the message is one line for the operator)."""


async def _with_store(settings: Settings, fn: Callable[[Store], Awaitable[int]]) -> int:
    store = create_store(settings)
    try:
        await store.open()
    except Exception as exc:
        raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
    try:
        try:
            await store.migrate()
        except Exception as exc:
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
        # What a stopped gateway journaled belongs in the store before keys, usage or sync look at it.
        await recover_journal(store, settings.journal_path)
        return await fn(store)
    finally:
        await store.close()


async def _migrate(store: Store) -> int:
    return 0  # _with_store already migrated


def _keys(args: argparse.Namespace, settings: Settings) -> Callable[[Store], Awaitable[int]]:
    async def run(store: Store) -> int:
        if args.keys_command == "create":
            try:
                check_user_id(args.user)
                check_key_name(args.name)
            except (InvalidUserId, InvalidKeyName) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            if args.email:
                from gateway.polar.client import PolarBillingError
                from gateway.polar.commands import ensure_customer

                try:
                    await ensure_customer(settings, args.user, args.email, out=sys.stderr if args.json else None)
                except (ConfigError, PolarBillingError) as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 1
            issued = await issue_key(store, args.user, args.name)
            if args.json:
                print(json.dumps({"id": issued.record.id, "key": issued.key, "user_id": args.user}))
            else:
                print(f"key id {issued.record.id} for user {args.user} (shown once, store it now):")
                print(issued.key)
            return 0
        if args.keys_command == "list":
            keys = await store.list_keys(args.user)
            if args.json:
                print(json.dumps([key_json(k) for k in keys]))
            for k in [] if args.json else keys:
                state = "revoked" if k.revoked_at else "active"
                print(f"{k.id}  {k.user_id}  {k.prefix}...  {state}  {k.name}")
            return 0
        if await store.revoke_key(args.key_id):
            await store.notify_invalidation(InvalidationKind.KEY, args.key_id)
            print(f"revoked {args.key_id} (running gateways refuse it within 1 s)")
            return 0
        print(f"error: no active key {args.key_id}", file=sys.stderr)
        return 1

    return run


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from gateway.logs import configure_logging
    from gateway.server import ensure_fd_headroom, server_config

    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.port is not None and not 0 <= args.port <= 65535:
        print(f"error: --port must be 0-65535, got {args.port}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    if args.workers > 1:
        return _serve_workers(args, settings)
    from gateway.app import create_app

    app = create_app(settings)
    tune_collector()
    ensure_fd_headroom(settings.max_connections)
    server = uvicorn.Server(server_config(app, settings, args.host, args.port))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down on
        pass
    return 0 if server.started else 1


def _serve_workers(args: argparse.Namespace, settings: Settings) -> int:
    """N worker processes, each on a listening socket of its own, restarted when one dies (`Supervisor`).
    Migrations and the recovery of what a previous run left run once, here, before any worker starts;
    every worker is a process of its own on the shared database (own id, journal segments, heartbeat)."""
    import os

    from gateway.metrics import worker_exited
    from gateway.server import server_config
    from gateway.workers import Supervisor, reserve

    try:
        asyncio.run(_with_store(settings, _migrate))
    except Exception as exc:
        print(f"error: the database is not ready: {exc}", file=sys.stderr)
        return 1
    os.environ["GATEWAY_SHARED"] = "1"  # the workers' environment: they share the database
    if settings.metrics != "off":
        from gateway.metrics import prepare_multiprocess

        prepare_multiprocess(args.workers)
    config = server_config("gateway.app:app_from_env", settings, args.host, args.port, workers=args.workers)
    try:
        sock = reserve(config.host, config.port)
    except OSError as exc:
        print(f"error: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    logging.getLogger("gateway").info("running on http://%s with %d workers", where, args.workers)
    supervisor = Supervisor(config, sock, on_exit=worker_exited)
    try:
        supervisor.run()
    finally:
        sock.close()
    return 1 if supervisor.failed_to_start else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return _serve(args, settings)
    job: Callable[[Store], Awaitable[int]]
    if args.command == "migrate":
        job = _migrate
    elif args.command == "keys":
        job = _keys(args, settings)
    elif args.command == "usage":
        from gateway.polar.commands import print_usage

        def job(store: Store) -> Awaitable[int]:
            return print_usage(store, args.user, args.json)
    elif args.command == "sync":
        from gateway.polar.commands import run_sync

        def job(store: Store) -> Awaitable[int]:
            return run_sync(settings, store, args.retry_failed)
    else:
        from gateway.polar.commands import polar_setup

        return asyncio.run(polar_setup(settings))
    try:
        result: Any = asyncio.run(_with_store(settings, job))
    except StoreUnavailable as exc:
        print(f"error: the database is not ready: {exc}", file=sys.stderr)
        return 1
    return int(result)


if __name__ == "__main__":
    sys.exit(main())
