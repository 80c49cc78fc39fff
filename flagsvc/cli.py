"""The ``flagsvc`` admin command: serve, tokens, audit verification.

Admin commands talk to Redis directly: ``--redis-url``/``FLAGSVC_REDIS_URL``, or the embedded
Redis of the ``flagsvc serve`` running on ``--data-dir``/``FLAGSVC_DATA_DIR``. They never start
a Redis or create a data folder: with neither, they fail and say what to do.

Each command imports what it needs when it runs: ``flagsvc serve``, which stays for the life of the
service as its supervising process, imports neither redis-py, nor Flask, nor the stores.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import embedded
from . import serve as serve_mod

if TYPE_CHECKING:
    import redis

F = TypeVar("F", bound=Callable[..., Any])
#: ``tokens.Role``'s names, lowest first (tests/test_serve_processes.py checks that they agree).
ROLE_NAMES = ("sdk", "reader", "operator", "admin")


def _data_dir_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--data-dir",
        envvar="FLAGSVC_DATA_DIR",
        default="./flagsvc-data",
        show_default=True,
        type=click.Path(file_okay=False, path_type=Path),
        help=help_text,
    )


serve_data_dir_option = _data_dir_option("Folder of the embedded Redis (used when no Redis URL is given).")
data_dir_option = _data_dir_option(
    "Data folder of the running `flagsvc serve` whose embedded Redis to use (when no Redis URL is given)."
)
redis_url_option = click.option(
    "--redis-url", envvar="FLAGSVC_REDIS_URL", default=None, help="Redis URL (FLAGSVC_REDIS_URL)."
)


def cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


@contextlib.contextmanager
def redis_for(redis_url: str | None, data_dir: Path) -> Iterator[redis.Redis]:
    """The Redis an admin command works on: ``redis_url``, or the embedded one of the
    ``flagsvc serve`` running on ``data_dir``. Never one of its own: that would be empty."""
    from .connection import connect

    client = connect(redis_url or _running_service_url(data_dir))
    try:
        yield client
    finally:
        client.close()


def _running_service_url(data_dir: Path) -> str:
    socket = embedded.running_socket(data_dir)
    if socket is None:
        raise click.ClickException(
            f"no flagsvc serve runs on {data_dir.resolve()}: start `flagsvc serve`, pass the --data-dir "
            "of the running service, or give --redis-url (FLAGSVC_REDIS_URL)"
        )
    return embedded.url_for_socket(socket)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """flagsvc: feature flags and kill switches for production incidents."""


@main.command()
@click.option("--host", envvar="FLAGSVC_HOST", default="127.0.0.1", show_default=True)
@click.option("--port", envvar="FLAGSVC_PORT", default=8000, show_default=True, type=int)
@click.option("--workers", envvar="FLAGSVC_WORKERS", default=None, type=int, help="gunicorn workers.")
@click.option(
    "--control-port",
    envvar="FLAGSVC_CONTROL_PORT",
    default=None,
    type=int,
    help="Also serve the API here with a worker of its own, for operators: "
    "kills sent here do not queue behind SDK polls.",
)
@serve_data_dir_option
@redis_url_option
def serve(
    host: str, port: int, workers: int | None, control_port: int | None, data_dir: Path, redis_url: str | None
) -> None:
    """Serve the API with gunicorn; with no Redis URL, on an embedded Redis in --data-dir."""
    sys.exit(serve_mod.run(host, port, data_dir, workers, redis_url, control_port))


@main.group()
def token() -> None:
    """Create, list and revoke API tokens."""


def _env_name(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    from .envs import ENV_NAME

    for value in values:
        if value != "*" and not ENV_NAME.fullmatch(value):
            raise click.BadParameter(f"{value!r} is not an environment name")
    return list(values)


@token.command("create")
@click.option("--name", required=True, help="Unique name; it is the actor in the audit log.")
@click.option("--role", required=True, type=click.Choice(ROLE_NAMES))
@click.option(
    "--env", "envs", multiple=True, callback=_env_name, help="Allowed environment (repeat); all if none."
)
@click.option("--expires", default=None, help="Lifetime such as 30d, 12h.")
@click.option("--json", "as_json", is_flag=True, help="Print the token as JSON.")
@data_dir_option
@redis_url_option
def token_create(
    name: str,
    role: str,
    envs: list[str],
    expires: str | None,
    as_json: bool,
    data_dir: Path,
    redis_url: str | None,
) -> None:
    """Create a token. Its secret is printed once and never stored."""
    from .durations import parse_duration
    from .errors import AlreadyExists
    from .tokens import Role, TokenStore

    try:
        expires_in = parse_duration(expires) if expires else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--expires") from None
    with redis_for(redis_url, data_dir) as client:
        try:
            record, secret = TokenStore(client).create(
                name=name, role=Role.parse(role), envs=envs, expires_in=expires_in, actor=cli_actor()
            )
        except AlreadyExists as exc:
            raise click.ClickException(exc.detail) from None
    if as_json:
        click.echo(json.dumps({**record.public(), "token": secret}))
    else:
        click.echo(secret)
        click.echo(
            f"# {record.name}: role {record.role}, envs {','.join(record.envs)}, "
            f"expires {record.expires_at or 'never'}; shown once",
            err=True,
        )


@token.command("list")
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
@redis_url_option
def token_list(as_json: bool, data_dir: Path, redis_url: str | None) -> None:
    """List tokens (never their secrets)."""
    from .tokens import TokenStore

    with redis_for(redis_url, data_dir) as client:
        records = TokenStore(client).list()
    if as_json:
        click.echo(json.dumps([t.public() for t in records]))
        return
    for t in records:
        state = "active" if t.is_active() else ("revoked" if t.revoked_at else "expired")
        click.echo(
            f"{t.id}  {t.name:<24} {t.role:<8} {','.join(t.envs):<20} {state:<8} "
            f"expires {t.expires_at or 'never'}"
        )


@token.command("revoke")
@click.argument("name_or_id")
@click.option("--reason", default="", help="Why, for the audit log.")
@data_dir_option
@redis_url_option
def token_revoke(name_or_id: str, reason: str, data_dir: Path, redis_url: str | None) -> None:
    """Revoke a token by name or id; effective within a second."""
    from .errors import TokenNotFound
    from .tokens import TokenStore

    with redis_for(redis_url, data_dir) as client:
        try:
            record = TokenStore(client).revoke(name_or_id, actor=cli_actor(), reason=reason)
        except TokenNotFound as exc:
            raise click.ClickException(exc.detail) from None
    click.echo(f"revoked {record.name} ({record.id})")


@main.command()
@click.option("--interval", default=1.0, show_default=True, type=float, help="Seconds between passes.")
@click.option("--once", is_flag=True, help="One pass over the due reverts, then exit.")
@data_dir_option
@redis_url_option
def worker(interval: float, once: bool, data_dir: Path, redis_url: str | None) -> None:
    """Perform due automatic reverts of temporary changes (``for``) and deliver webhooks. Any
    number may run: each revert happens exactly once, each subscription is delivered by one at a
    time. gunicorn workers started by `flagsvc serve` run both too."""
    from .clients import ClientRegistry
    from .config import service_config
    from .extensions import allowed_hosts, limits_from
    from .scheduler import Scheduler
    from .webhooks import Deliverer

    config = service_config()
    with redis_for(redis_url, data_dir) as client:
        scheduler = Scheduler(client, interval=interval, clients=ClientRegistry(client, limits_from(config)))
        if once:
            click.echo(f"{scheduler.run_once()} due reverts handled")
            return
        deliverer = Deliverer(
            client, allowed_hosts=allowed_hosts(config), public_url=str(config.get("PUBLIC_URL") or "")
        )
        deliverer.start()
        click.echo(f"flagsvc worker: reverting temporary changes every {interval:g} s, delivering webhooks")
        with contextlib.suppress(KeyboardInterrupt):
            scheduler.run_forever()
        deliverer.stop()


@main.command("export")
@click.option("--env", required=True, help="Environment to export.")
@data_dir_option
@redis_url_option
def export_command(env: str, data_dir: Path, redis_url: str | None) -> None:
    """Print the flags and playbooks of --env as JSON (a backup; config you can keep in git)."""
    from .definitions import export_env
    from .envs import ENV_NAME

    if not ENV_NAME.fullmatch(env):
        raise click.BadParameter(f"{env!r} is not an environment name", param_hint="--env")
    with redis_for(redis_url, data_dir) as client:
        click.echo(json.dumps(export_env(client, env, metadata=True), indent=2))


@main.command("import")
@click.option("--env", required=True, help="Environment to import into (created if missing).")
@click.argument("file", type=click.File("r"))
@data_dir_option
@redis_url_option
def import_command(env: str, file: Any, data_dir: Path, redis_url: str | None) -> None:
    """Make --env hold the flags and playbooks of an export FILE ('-' for stdin): validated
    first, applied in one audited commit, idempotent. Flags not in the file are left alone, and
    so is what containment holds (a flag's on/off state, flags of applied playbooks)."""
    from .definitions import apply_definitions, parse_document, summary
    from .envs import ENV_NAME
    from .errors import InvalidInput
    from .writes import WriteContext

    if not ENV_NAME.fullmatch(env):
        raise click.BadParameter(f"{env!r} is not an environment name", param_hint="--env")
    try:
        declared = parse_document(json.load(file))
    except ValueError as exc:
        raise click.ClickException(f"{file.name}: not JSON: {exc}") from None
    except InvalidInput as exc:
        raise click.ClickException(f"{file.name}: {exc.detail}") from None
    ctx = WriteContext(actor=cli_actor(), reason=f"import from {os.path.basename(file.name)}")
    with redis_for(redis_url, data_dir) as client:
        plan = apply_definitions(client, env, declared, ctx).result
    click.echo(f"imported into {env!r}: {summary(plan)}")
    for kept in plan.kept:
        click.echo(f"  left alone: {kept['type']} {kept['name']}: {kept['reason']}")


@main.group()
def audit() -> None:
    """Audit log tools."""


def _require_env(client: redis.Redis, env: str) -> None:
    """An environment that does not exist has no log to verify: a typo, or the wrong Redis."""
    from .envs import EnvStore

    envs = EnvStore(client)
    if not envs.exists(env):
        known = ", ".join(envs.list()) or "none"
        raise click.ClickException(f"environment {env!r} does not exist (environments: {known})")


@audit.command("verify")
@click.option("--env", default=None, help="Environment whose audit log to verify.")
@click.option("--system", is_flag=True, help="Verify the system log (tokens, environments).")
@click.option(
    "--archive",
    "archives",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Archive files of earlier trims, oldest first: verify from the very first entry.",
)
@click.option(
    "--textfile",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the result for node_exporter's textfile collector (flagsvc_audit_chain_ok).",
)
@click.option(
    "--expect-head",
    default=None,
    help="SEQ:HASH of a head copied off the host earlier (GET flagsvc:{ENV}:audit:head): the chain "
    "must still hold that entry, else its tail was lost or rewritten (a Redis rollback).",
)
@data_dir_option
@redis_url_option
def audit_verify(
    env: str | None,
    system: bool,
    archives: tuple[Path, ...],
    textfile: Path | None,
    expect_head: str | None,
    data_dir: Path,
    redis_url: str | None,
) -> None:
    """Walk the hash chain; exit 1 and name the first bad entry if one was edited or removed."""
    from .audit import AuditLog
    from .envs import ENV_NAME
    from .keys import EnvKeys, SystemKeys
    from .retention import read_archive

    if bool(env) == system:
        raise click.UsageError("give exactly one of --env E or --system")
    if env and not ENV_NAME.fullmatch(env):
        raise click.BadParameter(f"{env!r} is not an environment name", param_hint="--env")
    expected = _head_option(expect_head)
    ns = SystemKeys() if system else EnvKeys(env or "")
    with redis_for(redis_url, data_dir) as client:
        if env:
            _require_env(client, env)
        result = AuditLog(client, ns).verify([read_archive(a) for a in archives], expect_head=expected)
    label = "system log" if system else f"environment {env!r}"
    if textfile is not None:
        _write_textfile(textfile, "_system" if system else str(env), result.ok)
    if result.ok:
        click.echo(f"ok: {label}: {result.entries} entries, hash chain intact")
        return
    click.echo(
        f"FAILED: {label}: after {result.entries} good entries, entry {result.bad_entry}: {result.problem}",
        err=True,
    )
    sys.exit(1)


def _head_option(text: str | None) -> tuple[int, str] | None:
    if text is None:
        return None
    seq, sep, digest = text.partition(":")
    if not sep or not seq.isascii() or not seq.isdigit() or len(digest) != 64:
        raise click.BadParameter(
            "SEQ:HASH, as GET flagsvc:{ENV}:audit:head shows it", param_hint="--expect-head"
        )
    return int(seq), digest


def _write_textfile(textfile: Path, name: str, ok: bool) -> None:
    """The result for node_exporter's textfile collector, written atomically."""
    tmp = textfile.with_suffix(".tmp")
    tmp.write_text(
        "# HELP flagsvc_audit_chain_ok 1 if the audit hash chain verified\n"
        "# TYPE flagsvc_audit_chain_ok gauge\n"
        f'flagsvc_audit_chain_ok{{env="{name}"}} {int(ok)}\n'
        "# HELP flagsvc_audit_chain_verified_timestamp_seconds When the chain was last verified\n"
        "# TYPE flagsvc_audit_chain_verified_timestamp_seconds gauge\n"
        f'flagsvc_audit_chain_verified_timestamp_seconds{{env="{name}"}} {time.time():.0f}\n'
    )
    tmp.replace(textfile)


@audit.command("trim")
@click.option("--env", required=True, help="Environment whose audit log to trim.")
@click.option("--before", required=True, help="Cut-off: ISO 8601 time, or a duration ago (90d).")
@click.option(
    "--archive",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="New file that receives the trimmed entries (never overwritten).",
)
@data_dir_option
@redis_url_option
def audit_trim(env: str, before: str, archive: Path, data_dir: Path, redis_url: str | None) -> None:
    """Archive the entries older than --before to a file, then trim them (audited)."""
    from .durations import parse_moment
    from .envs import ENV_NAME
    from .retention import trim

    if not ENV_NAME.fullmatch(env):
        raise click.BadParameter(f"{env!r} is not an environment name", param_hint="--env")
    try:
        cutoff = parse_moment(before)
    except ValueError:
        raise click.BadParameter(
            "an ISO 8601 time or a duration such as 90d", param_hint="--before"
        ) from None
    with redis_for(redis_url, data_dir) as client:
        try:
            result = trim(client, env, cutoff, archive, actor=cli_actor())
        except FileExistsError:
            raise click.ClickException(f"{archive} exists: archives are never overwritten") from None
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    if not result.archived:
        click.echo(f"nothing older than {cutoff.isoformat()} in {env!r}")
        return
    click.echo(
        f"archived {result.archived} entries of {env!r} (through {result.through_id}) to {archive}, "
        f"sha256 {result.sha256}; trimmed"
    )


if __name__ == "__main__":
    main()
