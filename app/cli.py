"""distill: run the service (up: embedded; api, worker, serve: server mode) and use it.

The client commands (teachers, datasets, jobs, download, predict) talk to the API at --url
(default: $DISTILL_URL, else http://127.0.0.1:8000, where distill up listens) through
app.client, with the API key of --api-key (default: $DISTILL_API_KEY) where the server requires
keys; --json prints the API's JSON for scripts. keys makes, lists and revokes API keys straight in
the server's database (run it where the server's settings are). With authentication off (the
embedded default), up, api and serve listen on loopback only, unless DISTILL_AUTH=disabled says
so explicitly. Exit codes: 0 done; 1 the API refused (its problem's detail and code on stderr),
could not be reached, or keys found no such key or no usable database; 2 a usage error, or a
server asked to listen beyond loopback with authentication off; jobs submit --watch and jobs
watch: 3 the job failed, 4 it was cancelled.
"""

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table

from app.config import Settings, get_settings
from app.ml.signature import OutputKind
from app.models import ArtifactFormat, JobStatus, KeyRole
from app.queue import CONTROL_QUEUE, QUEUE

if TYPE_CHECKING:
    from alembic.config import Config
    from pydantic import BaseModel
    from sqlalchemy.orm import Session

    from app.client import DistillClient
    from app.jobs.schemas import JobOut, JobResult
    from app.models import ApiKey

EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_JOB_FAILED = 3
EXIT_JOB_CANCELLED = 4

app = typer.Typer(
    name="distill", help=__doc__, no_args_is_help=True, add_completion=False, rich_markup_mode=None
)
teachers_app = typer.Typer(help="Upload, list, show and delete teachers.", no_args_is_help=True)
datasets_app = typer.Typer(help="Upload and list datasets.", no_args_is_help=True)
jobs_app = typer.Typer(
    help="Submit and follow jobs; list, show, cancel them, read their metrics.",
    no_args_is_help=True,
)
keys_app = typer.Typer(
    help="Make, list and revoke API keys, straight in the server's database (no HTTP).",
    no_args_is_help=True,
)
app.add_typer(teachers_app, name="teachers")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
app.add_typer(keys_app, name="keys")

out = Console()
err = Console(stderr=True)

Host = Annotated[str, typer.Option(help="address to listen on")]
Port = Annotated[int, typer.Option(help="port to listen on")]
Url = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="the Distill API (default: $DISTILL_URL, else http://127.0.0.1:8000)",
        show_default=False,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="DISTILL_API_KEY",
        help="the API key, where the server requires keys (distill keys create makes one)",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON (the API's shapes) for scripts")]


class BuiltinDownload(StrEnum):
    """Builtin datasets whose files ``distill download`` fetches from the internet."""

    FASHION_MNIST = "fashion-mnist"


# -- running the service ----------------------------------------------------------------------


def alembic_config() -> "Config":
    """Alembic's configuration, for a source checkout or an installed image."""
    from alembic.config import Config

    # A source checkout has alembic.ini beside app/; an installed image runs from its directory.
    checkout = Path(__file__).resolve().parent.parent
    root = checkout if (checkout / "alembic.ini").exists() else Path.cwd()
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    return config


def migrate() -> None:
    """Bring the database schema up to date."""
    from alembic import command

    command.upgrade(alembic_config(), "head")


def worker_command(
    concurrency: int, beat: bool, queues: str = f"{QUEUE},{CONTROL_QUEUE}"
) -> list[str]:
    """The command line of a Celery worker on ``queues``, with the recovery schedule if ``beat``."""
    settings = get_settings()
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--loglevel",
        "INFO",
        "--concurrency",
        str(concurrency),
        "--queues",
        queues,
    ]
    if beat:
        settings.home.mkdir(parents=True, exist_ok=True)
        command += ["--beat", "--schedule", str((settings.home / "celerybeat-schedule").resolve())]
    return command


def api_command(host: str, port: int) -> list[str]:
    """The command line of the API server."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:create_app",
        "--factory",
        "--host",
        host,
        "--port",
        str(port),
    ]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: it may resolve to anything
        return False


def may_listen(host: str, settings: Settings) -> bool:
    """Whether a server may listen on ``host``: anywhere with API keys required or with
    authentication disabled explicitly (``DISTILL_AUTH=disabled``), else on loopback only."""
    return settings.auth_required or settings.auth == "disabled" or is_loopback(host)


def check_listen(command: str, host: str) -> None:
    """Before ``command`` (up, api, serve) listens on ``host``: refuse with exit code 2 where
    ``may_listen`` says no, else say on stderr when authentication is off."""
    settings = get_settings()
    if not may_listen(host, settings):
        print(
            f"distill {command}: refusing to listen on {host}: authentication is off (embedded "
            "mode), which is for loopback only (127.0.0.1, ::1, localhost). Set "
            "DISTILL_AUTH=required to require API keys (distill keys create makes them), or "
            "DISTILL_AUTH=disabled to serve without keys anyway.",
            file=sys.stderr,
            flush=True,
        )
        raise typer.Exit(EXIT_USAGE)
    if settings.auth_required:
        return
    if settings.auth == "disabled":
        notice = f"DISTILL_AUTH=disabled: whoever reaches {host} can use it"
    else:
        notice = "embedded mode, loopback only; DISTILL_AUTH=required turns API keys on"
    print(f"distill {command}: authentication is off ({notice})", file=sys.stderr, flush=True)


@app.command(short_help="Migrate, then run API and worker together.")
def up(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """Migrate, then run the API and one worker (with the recovery schedule) until Ctrl-C,
    restarting either if it dies: the worker's recovery schedule is what requeues a job whose
    process was killed, so it must not stay dead unnoticed."""
    check_listen("up", host)
    migrate()
    commands = [worker_command(concurrency=1, beat=True), api_command(host, port)]
    # One core is left to the API: a job using them all stalls between epochs whenever the API
    # answers a poll (measured on 2 cores: a 50-epoch job 2.8 s alone, 12.6 s polled at 1 Hz).
    cores = len(os.sched_getaffinity(0))
    env = {"DISTILL_TORCH_THREADS": str(max(1, cores - 1))} | dict(os.environ)
    processes = [subprocess.Popen(command, env=env) for command in commands]
    restarts = [0] * len(commands)
    print(f"Distill is up: http://{host}:{port}/docs (Ctrl-C stops it)", flush=True)

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT as well as Ctrl-C's: a shell starts a background job with SIGINT ignored, and
    # Python keeps an ignored SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        while True:
            time.sleep(1)
            for i, process in enumerate(processes):
                if process.poll() is None:
                    continue
                restarts[i] += 1
                # Back off when a process keeps dying at once (a port taken, a bad setting).
                delay = min(30, 2 ** (restarts[i] - 1))
                name = "worker" if i == 0 else "API"
                print(
                    f"distill up: the {name} exited ({process.returncode}); restarting it in "
                    f"{delay} s (restart {restarts[i]})",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(delay)
                processes[i] = subprocess.Popen(commands[i], env=env)
    except KeyboardInterrupt:
        pass
    finally:
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


@app.command()
def api(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """Run the API."""
    check_listen("api", host)
    os.execv(sys.executable, api_command(host, port))


@app.command()
def serve(
    host: Host = "127.0.0.1",
    port: Port = 8000,
    workers: Annotated[int, typer.Option(help="server processes (each loads its own models)")] = 1,
) -> None:
    """Serve students only: Open Inference Protocol v2, /predict, health."""
    check_listen("serve", host)
    command = api_command(host, port)
    command[command.index("app.main:create_app")] = "app.serving.app:create_serving_app"
    command += ["--workers", str(workers)]
    os.execv(sys.executable, command)


@app.command()
def worker(
    concurrency: Annotated[
        int, typer.Option(help="jobs at once on this host (all on DISTILL_DEVICE)")
    ] = 1,
    beat: Annotated[bool, typer.Option("--beat", help="also run the recovery schedule")] = False,
    queues: Annotated[
        str,
        typer.Option(
            help=f"{QUEUE}: training jobs; {CONTROL_QUEUE}: recovery of jobs whose worker died"
        ),
    ] = f"{QUEUE},{CONTROL_QUEUE}",
) -> None:
    """Run a Celery worker."""
    os.execv(sys.executable, worker_command(concurrency, beat, queues))


app.command("migrate")(migrate)


# -- using it: shared parts -------------------------------------------------------------------


@contextmanager
def connect(url: str | None, api_key: str | None, as_json: bool) -> Iterator["DistillClient"]:
    """A client of the API at ``url`` with ``api_key``; an API error or an unreachable server
    ends the command with exit code 1 and the problem on stderr (as JSON with ``--json``; else
    with a hint when the server wants a key)."""
    # Imported here: the client's schemas load torch, which the server commands do not need.
    from app.client import DistillClient, DistillError

    client = DistillClient(url, api_key=api_key)
    try:
        with client:
            yield client
    except DistillError as e:
        problem = e.problem | {"status": e.status, "code": e.code, "detail": e.detail}
        hint = None
        if e.status == 401:
            hint = "this server needs an API key: --api-key or DISTILL_API_KEY"
            if e.code != "unauthorized":
                hint += " (this one was refused; distill keys create on the server makes one)"
        fail(problem, as_json, hint)
    except httpx.TransportError as e:
        detail = f"cannot reach Distill at {client.url}: {e}"
        fail({"status": None, "code": "unreachable", "detail": detail}, as_json)


def fail(problem: dict[str, Any], as_json: bool, hint: str | None = None) -> NoReturn:
    """Print ``problem`` (its detail, status, code and field, then ``hint``; the problem alone
    as JSON with ``--json``) on stderr and exit with code 1."""
    if as_json:
        typer.echo(json.dumps(problem), err=True)
    else:
        where = [str(problem[key]) for key in ("status", "code") if problem.get(key) is not None]
        if problem.get("field") is not None:
            where.append(f"field {problem['field']}")
        message = f"[bold red]Error:[/] {escape(str(problem['detail']))} ({' '.join(where)})"
        err.print(message, soft_wrap=True)
        if hint is not None:
            err.print(f"Hint: {escape(hint)}", soft_wrap=True)
    raise typer.Exit(EXIT_API_ERROR)


def print_json(value: "BaseModel | Sequence[BaseModel | dict[str, Any]] | dict[str, Any]") -> None:
    """``value`` as JSON on stdout (a list of models or dicts as a JSON array)."""
    if isinstance(value, Sequence):
        data: Any = [
            item if isinstance(item, dict) else item.model_dump(mode="json") for item in value
        ]
    elif isinstance(value, dict):
        data = value
    else:
        data = value.model_dump(mode="json")
    typer.echo(json.dumps(data, indent=2))


def fmt(value: float | int | None, spec: str, unit: str = "") -> str:
    """``value`` formatted with ``spec`` (and ``unit``), or a dash when it was not measured."""
    return "-" if value is None else f"{value:{spec}}{unit}"


def megabytes(size: int | None) -> str:
    """A size in MB, or a dash."""
    return "-" if size is None else f"{size / 1e6:.2f} MB"


def id_column(header: str = "id") -> Column:
    """A column of ids, never cut nor wrapped: they are there to be copied."""
    return Column(header, no_wrap=True, min_width=36)


def listing(*columns: str | Column) -> Table:
    """A table of one line a row: ids whole (``id_column``), other cells cut with an ellipsis
    when the terminal is narrow, names (``name``) at most 24 characters."""
    table = Table()
    for column in columns:
        if isinstance(column, str):
            width = 24 if column == "name" else None
            column = Column(column, no_wrap=True, overflow="ellipsis", max_width=width)
        table.columns.append(column)
    return table


def fields_table(rows: list[tuple[str, str]]) -> Table:
    """A two-column table of names and values."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    # Wide enough for a sha256 on an 80-column terminal: ids and digests are for copying.
    table.add_column(min_width=64)
    for name, value in rows:
        table.add_row(name, escape(value))
    return table


def result_table(result: "JobResult") -> Table:
    """Teacher against student (and the int8 student when it was measured)."""
    int8 = result.int8_accuracy is not None
    table = Table(title="teacher vs student", title_justify="left")
    table.add_column("")
    for name in ("teacher", "student") + (("student int8",) if int8 else ()):
        table.add_column(name, justify="right")
    rows = [
        (
            "test accuracy",
            fmt(result.teacher_accuracy, ".4f"),
            fmt(result.student_accuracy, ".4f"),
            fmt(result.int8_accuracy, ".4f"),
        ),
        (
            "accuracy retained",
            "",
            fmt(result.accuracy_retained, ".1f", "%"),
            "-"
            if result.int8_accuracy is None or not result.teacher_accuracy
            else f"{100 * result.int8_accuracy / result.teacher_accuracy:.1f}%",
        ),
        ("agreement with teacher", "", fmt(result.agreement, ".4f"), "-"),
        (
            "parameters",
            f"{result.teacher_parameters:,}",
            f"{result.student_parameters:,}",
            f"{result.student_parameters:,}",
        ),
        (
            "size on disk",
            megabytes(result.teacher_size_bytes),
            megabytes(result.student_size_bytes),
            megabytes(result.int8_size_bytes),
        ),
        (
            "latency / sample",
            fmt(result.teacher_latency_ms, ".3f", " ms"),
            fmt(result.student_latency_ms, ".3f", " ms"),
            fmt(result.int8_latency_ms, ".3f", " ms"),
        ),
    ]
    for row in rows:
        table.add_row(*(row if int8 else row[:3]))
    return table


def result_summary(result: "JobResult") -> str:
    """The job's compression, speed-up, best epoch and wall time, in one line."""
    return (
        f"compression {result.compression_ratio:.1f}x, speed-up "
        f"{fmt(result.speedup, '.1f', 'x')} (onnxruntime, 1 thread, batch 1), best epoch "
        f"{result.best_epoch}, {fmt(result.wall_seconds, '.1f', ' s')} on {result.device}"
    ) + (
        ""
        if result.int8_agreement is None
        else f"; int8 agrees with float32 on {100 * result.int8_agreement:.1f}%"
    )


def job_fields(job: "JobOut") -> Table:
    """A job's state, one field a row."""
    teachers = job.spec.get("teachers") or []
    teacher = job.teacher_id or ", ".join(str(t.get("id")) for t in teachers)
    rows = [
        ("id", job.id),
        ("status", job.status),
        ("phase", job.phase),
        ("progress", f"{100 * job.progress:.0f}%"),
        ("attempt", str(job.attempt)),
        ("teacher", teacher),
        ("dataset", job.dataset),
        ("student", json.dumps(job.spec.get("student"))),
        ("created", job.created_at.isoformat(timespec="seconds")),
        (
            "finished",
            "-" if job.finished_at is None else job.finished_at.isoformat(timespec="seconds"),
        ),
    ]
    if job.alias is not None:
        rows.append(("alias", job.alias))
    if job.error is not None:
        rows.append(("error", f"{job.error.get('detail')} ({job.error.get('code')})"))
    return fields_table(rows)


def print_job(job: "JobOut") -> None:
    """A job, and its teacher-vs-student table once it has a result."""
    out.print(job_fields(job))
    if job.result is not None:
        out.print(result_table(job.result))
        out.print(result_summary(job.result))


# -- API keys ---------------------------------------------------------------------------------


@contextmanager
def database(as_json: bool) -> Iterator["Session"]:
    """A session on the server's database, committed at the end; a refusal (an unknown key, a
    bad tenant name) or an unusable database ends the command with exit code 1 and the problem
    on stderr (as JSON with ``--json``)."""
    from sqlalchemy.exc import SQLAlchemyError

    from app.db import session_scope
    from app.errors import AppError

    try:
        with session_scope() as session:
            yield session
    except AppError as e:
        fail({"status": None, "code": e.code, "detail": e.detail, **e.extra}, as_json)
    except SQLAlchemyError as e:
        cause = getattr(e, "orig", None) or e
        detail = f"cannot use the database (has distill migrate run?): {cause}"
        fail({"status": None, "code": "database_error", "detail": detail}, as_json)


def key_record(key: "ApiKey", tenant: str) -> dict[str, Any]:
    """An API key's fields as ``keys`` prints them with ``--json``: never its hash."""
    return {
        "id": key.id,
        "prefix": key.prefix,
        "tenant": tenant,
        "role": str(key.role),
        "name": key.name,
        "created_at": key.created_at.isoformat(),
        "expires_at": None if key.expires_at is None else key.expires_at.isoformat(),
        "revoked_at": None if key.revoked_at is None else key.revoked_at.isoformat(),
    }


def day(value: datetime | None, none: str = "-") -> str:
    """The UTC date of ``value`` (ISO 8601), or ``none``."""
    return none if value is None else value.astimezone(UTC).date().isoformat()


@keys_app.command("create")
def keys_create(
    tenant: Annotated[
        str, typer.Option(help="the tenant the key acts for (created if new)", show_default=False)
    ],
    role: Annotated[
        KeyRole, typer.Option(help="admin: also reads the deployment's /metrics")
    ] = KeyRole.MEMBER,
    name: Annotated[str, typer.Option(help="a label, to tell keys apart")] = "",
    expires_in_days: Annotated[
        int | None, typer.Option(min=1, help="days until it expires (default: never)")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Make an API key; it is shown once, only its hash is stored."""
    from app.auth import create_key

    expires_at = None
    if expires_in_days is not None:
        expires_at = datetime.now(UTC) + timedelta(days=expires_in_days)
    with database(as_json) as session:
        key, token = create_key(session, tenant, role, name=name, expires_at=expires_at)
        record = key_record(key, tenant)
    # Committed: only now is the key good for anything.
    if as_json:
        print_json(record | {"key": token})
        return
    rows = [
        ("prefix", key.prefix),
        ("tenant", tenant),
        ("role", str(role)),
        ("name", name or "-"),
        (
            "expires",
            "never" if key.expires_at is None else key.expires_at.isoformat(timespec="seconds"),
        ),
    ]
    out.print(fields_table(rows))
    out.print("[bold]The key (store it now: it is not shown again):[/]")
    typer.echo(token)
    if not get_settings().auth_required:
        err.print(
            "Note: with these settings authentication is off; the server checks keys once "
            "it runs with DISTILL_AUTH=required (the default with DISTILL_DATABASE_URL set)."
        )


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None,
    as_json: AsJson = False,
) -> None:
    """List API keys, newest first (never the keys themselves nor their hashes)."""
    from app.auth import list_keys

    with database(as_json) as session:
        keys = list_keys(session, tenant)
        records = [key_record(key, tenant_name) for key, tenant_name in keys]
    if as_json:
        print_json(records)
        return
    # Prefixes (to revoke by), roles and dates whole; tenants and names cut when narrow.
    table = listing(
        Column("prefix", no_wrap=True, min_width=8),
        "tenant",
        Column("role", no_wrap=True, min_width=6),
        "name",
        *(Column(date, no_wrap=True, min_width=10) for date in ("created", "expires", "revoked")),
    )
    for key, tenant_name in keys:
        table.add_row(
            key.prefix,
            escape(tenant_name),
            str(key.role),
            escape(key.name) or "-",
            day(key.created_at),
            day(key.expires_at, "never"),
            day(key.revoked_at),
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    prefix: Annotated[str, typer.Argument(help="the key's prefix, or the whole key")],
    as_json: AsJson = False,
) -> None:
    """Revoke an API key: the server refuses it from its next request on."""
    from app.auth import revoke_key
    from app.models import Tenant

    with database(as_json) as session:
        key = revoke_key(session, prefix)
        record = key_record(key, session.get_one(Tenant, key.tenant_id).name)
    if as_json:
        print_json(record)
        return
    out.print(f"Key {key.prefix} of tenant {escape(record['tenant'])} revoked")


# -- teachers ---------------------------------------------------------------------------------


def load_json_option(value: str | None, option: str) -> Any:
    """A JSON-valued option, parsed; invalid JSON is a usage error."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"not JSON: {e}", param_hint=option) from None


@teachers_app.command("upload")
def teachers_upload(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="the teacher file")],
    name: Annotated[str | None, typer.Option(help="a name (default: the file name)")] = None,
    config: Annotated[
        str | None, typer.Option(help="JSON architecture config (safetensors only)")
    ] = None,
    output: Annotated[str | None, typer.Option(help="the output holding the scores")] = None,
    output_kind: Annotated[
        OutputKind | None, typer.Option(help="what the scores are (default: detected)")
    ] = None,
    classes: Annotated[
        str | None, typer.Option(help="JSON list of class names, one per score")
    ] = None,
    preprocessing: Annotated[
        str | None, typer.Option(help='JSON, e.g. \'{"kind": "image", "scale": 0.0039}\'')
    ] = None,
    url: Url = None,
    api_key: ApiKeyOption = None,
    as_json: AsJson = False,
) -> None:
    """Upload a teacher: ONNX, safetensors with --config, or a Hugging Face archive."""
    with connect(url, api_key, as_json) as client:
        teacher = client.upload_teacher(
            file,
            name=name,
            config=load_json_option(config, "--config"),
            output=output,
            output_kind=output_kind,
            classes=load_json_option(classes, "--classes"),
            preprocessing=load_json_option(preprocessing, "--preprocessing"),
        )
    if as_json:
        print_json(teacher)
        return
    out.print(
        f"Teacher {teacher.id}: {teacher.format}, {teacher.parameter_count:,} parameters, "
        f"{teacher.num_classes} classes"
    )


@teachers_app.command("list")
def teachers_list(url: Url = None, api_key: ApiKeyOption = None, as_json: AsJson = False) -> None:
    """List the uploaded teachers, newest first."""
    with connect(url, api_key, as_json) as client:
        teachers = client.list_teachers()
    if as_json:
        print_json(teachers)
        return
    table = listing(id_column(), "name", "format", "parameters", "input", "classes")
    for t in teachers:
        table.add_row(
            t.id,
            escape(t.name),
            t.format,
            f"{t.parameter_count:,}",
            "-" if t.input_shape is None else "x".join(map(str, t.input_shape)),
            str(t.num_classes),
        )
    out.print(table)


@teachers_app.command("show")
def teachers_show(
    teacher_id: Annotated[str, typer.Argument(help="the teacher's id")],
    url: Url = None,
    api_key: ApiKeyOption = None,
    as_json: AsJson = False,
) -> None:
    """Show a teacher: format, size, signature, feature layers."""
    with connect(url, api_key, as_json) as client:
        t = client.get_teacher(teacher_id)
    if as_json:
        print_json(t)
        return
    inputs = ", ".join(f"{i.name} {i.datatype} {i.shape}" for i in t.signature.inputs)
    classes = t.signature.scores.classes
    rows = [
        ("id", t.id),
        ("name", t.name),
        ("format", t.format),
        ("sha256", t.sha256),
        ("size", megabytes(t.size_bytes)),
        ("parameters", f"{t.parameter_count:,}"),
        ("inputs", inputs),
        ("scores", f"{t.output_name} ({t.signature.scores.kind}), {t.num_classes} classes"),
        ("classes", "-" if classes is None else ", ".join(classes)),
        ("feature layers", str(len(t.feature_layers or []))),
        ("created", t.created_at.isoformat(timespec="seconds")),
    ]
    out.print(fields_table(rows))


@teachers_app.command("rm")
def teachers_rm(
    teacher_id: Annotated[str, typer.Argument(help="the teacher's id")],
    url: Url = None,
    api_key: ApiKeyOption = None,
    as_json: AsJson = False,
) -> None:
    """Delete a teacher that no unfinished job uses."""
    with connect(url, api_key, as_json) as client:
        client.delete_teacher(teacher_id)
    if as_json:
        print_json({"id": teacher_id, "deleted": True})
        return
    out.print(f"Teacher {teacher_id} deleted")


# -- datasets ---------------------------------------------------------------------------------


@datasets_app.command("upload")
def datasets_upload(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help=".npz, or CSV/TSV/JSONL/Parquet")
    ],
    test_file: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="text: the test split")
    ] = None,
    name: Annotated[str | None, typer.Option(help="a name (default: the file name)")] = None,
    classes: Annotated[
        str | None, typer.Option(help="JSON list of class names, one per label")
    ] = None,
    text_column: Annotated[str | None, typer.Option(help="text: the text column")] = None,
    text_pair_column: Annotated[
        str | None, typer.Option(help="text: the sentence pair's second column")
    ] = None,
    label_column: Annotated[str | None, typer.Option(help="text: the label column")] = None,
    url: Url = None,
    api_key: ApiKeyOption = None,
    as_json: AsJson = False,
) -> None:
    """Upload a dataset: .npz arrays (x, y, optional x_test, y_test) or text records."""
    with connect(url, api_key, as_json) as client:
        dataset = client.upload_dataset(
            file,
            test_file=test_file,
            name=name,
            classes=load_json_option(classes, "--classes"),
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
        )
    if as_json:
        print_json(dataset)
        return
    out.print(
        f"Dataset {dataset.ref}: {dataset.modality}, {dataset.num_classes} classes, "
        f"{dataset.train_size:,} train and {dataset.test_size:,} test samples"
    )


@datasets_app.command("list")
def datasets_list(url: Url = None, api_key: ApiKeyOption = None, as_json: AsJson = False) -> None:
    """List the builtin datasets (and whether the server has them) and the uploaded ones."""
    with connect(url, api_key, as_json) as client:
        datasets = client.list_datasets()
    if as_json:
        print_json(datasets)
        return
    table = listing(id_column("ref"), "modality", "name", "classes", "train", "test", "available")
    for d in datasets:
        table.add_row(
            d.ref,
            d.modality,
            escape(d.name),
            str(d.num_classes),
            f"{d.train_size:,}",
            f"{d.test_size:,}",
            "yes" if d.available else "no",
        )
    out.print(table)


# -- jobs -------------------------------------------------------------------------------------


def watch(client: "DistillClient", job: "JobOut") -> "JobOut":
    """Follow ``job`` on its events with a live progress bar on stderr until it ends; the job
    as it ended."""
    epochs = job.spec.get("training", {}).get("epochs", "?")
    columns = (
        TextColumn("{task.fields[phase]:<15}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("val acc {task.fields[val_accuracy]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err) as progress:
        task = progress.add_task(
            job.id, total=100, phase=job.phase, epoch=0, epochs=epochs, loss="-", val_accuracy="-"
        )
        for event in client.events(job.id):
            data = event.data
            if event.event == "status":
                progress.update(task, phase=data["phase"])
            elif event.event == "progress":
                progress.update(task, completed=100 * data["progress"])
            elif event.event == "metrics":
                values = data["values"]
                progress.update(
                    task,
                    epoch=data["epoch"],
                    loss=fmt(values.get("train_loss"), ".4f"),
                    val_accuracy=fmt(values.get("val_accuracy"), ".4f"),
                )
    return client.get_job(job.id)


def watch_exit_code(job: "JobOut") -> int:
    """0 for a succeeded job, 4 for a cancelled one, 3 otherwise (failed)."""
    if job.status == JobStatus.SUCCEEDED:
        return 0
    return EXIT_JOB_CANCELLED if job.status == JobStatus.CANCELLED else EXIT_JOB_FAILED


def read_spec(path: Path, teacher: str | None, dataset: str | None) -> dict[str, Any]:
    """The job spec in ``path`` (JSON), with ``teacher`` and ``dataset`` set when given."""
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"not JSON: {e}", param_hint="SPEC") from None
    if not isinstance(spec, dict):
        raise typer.BadParameter("not a JSON object", param_hint="SPEC")
    if teacher is not None:
        spec = {k: v for k, v in spec.items() if k != "teachers"} | {"teacher": teacher}
    if dataset is not None:
        spec["dataset"] = dataset
    return spec


@jobs_app.command("submit")
def jobs_submit(
    spec_file: Annotated[
        Path,
        typer.Argument(
            metavar="SPEC.json",
            exists=True,
            dir_okay=False,
            help="the job spec, as POST /v1/jobs takes it",
        ),
    ],
    teacher: Annotated[
        str | None, typer.Option(help="the teacher id (replaces the spec's)")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="the dataset ref (replaces the spec's)")
    ] = None,
    watch_job: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="follow the job to its end (exit 3 if it fails, 4 if cancelled), then show "
            "teacher vs student",
        ),
    ] = False,
    url: Url = None,
    api_key: ApiKeyOption = None,
    as_json: AsJson = False,
) -> None:
    """Submit a distillation job."""
    spec = read_spec(spec_file, teacher, dataset)
    with connect(url, api_key, as_json) as client:
        job = client.submit_job(spec)
        if not as_json:
            out.print(f"Job {job.id} submitted ({job.status})")
            if job.preflight is not None:
                for finding in job.preflight.warnings:
                    err.print(f"warning {finding.code}: {escape(finding.detail)}")
        if watch_job:
            job = follow_quietly(client, job) if as_json else watch(client, job)
    if as_json:
        print_json(job)
    elif watch_job:
        print_job(job)
    if watch_job:
        raise typer.Exit(watch_exit_code(job))


def follow_quietly(client: "DistillClient", job: "JobOut") -> "JobOut":
    """Wait for ``job`` to end on its events, printing nothing; the job as it ended."""
    for _ in client.events(job.id):
        pass
    return client.get_job(job.id)


@jobs_app.command("list")
def jobs_list(
    status: Annotated[JobStatus | None, typer.Option(help="only jobs of this status")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="jobs per page")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="jobs to skip")] = 0,
    url: Url = None,
    api_key: ApiKeyOption = None,
    as_json: AsJson = False,
) -> None:
    """List jobs, newest first."""
    with connect(url, api_key, as_json) as client:
        page = client.list_jobs(limit=limit, offset=offset, status=status)
    if as_json:
        print_json(page)
        return
    table = listing(id_column(), "status", "phase", "progress", "accuracy", "dataset")
    for job in page.items:
        table.add_row(
            job.id,
            job.status,
            job.phase,
            f"{100 * job.progress:.0f}%",
            "-" if job.result is None else f"{job.result.student_accuracy:.4f}",
            job.dataset,
        )
    table.caption = f"{len(page.items)} of {page.total} (offset {page.offset})"
    out.print(table)


# The per-epoch figures a terminal has room for; --json gives them all.
METRIC_COLUMNS = ("train_loss", "val_accuracy", "val_agreement", "val_kl_to_teacher")
JobId = Annotated[str, typer.Argument(help="the job's id")]


@jobs_app.command("watch")
def jobs_watch(
    job_id: JobId, url: Url = None, api_key: ApiKeyOption = None, as_json: AsJson = False
) -> None:
    """Follow a job to its end (exit 3 if it fails, 4 if cancelled), then show it."""
    with connect(url, api_key, as_json) as client:
        job = client.get_job(job_id)
        job = follow_quietly(client, job) if as_json else watch(client, job)
    if as_json:
        print_json(job)
    else:
        print_job(job)
    raise typer.Exit(watch_exit_code(job))


@jobs_app.command("show")
def jobs_show(
    job_id: JobId, url: Url = None, api_key: ApiKeyOption = None, as_json: AsJson = False
) -> None:
    """Show a job: status, phase, progress, and its result or error."""
    with connect(url, api_key, as_json) as client:
        job = client.get_job(job_id)
    if as_json:
        print_json(job)
        return
    print_job(job)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: JobId, url: Url = None, api_key: ApiKeyOption = None, as_json: AsJson = False
) -> None:
    """Cancel a job: at once if queued, at the worker's next check if running."""
    with connect(url, api_key, as_json) as client:
        job = client.cancel_job(job_id)
    if as_json:
        print_json(job)
        return
    out.print(f"Job {job.id}: {job.status}")


@jobs_app.command("metrics")
def jobs_metrics(
    job_id: JobId, url: Url = None, api_key: ApiKeyOption = None, as_json: AsJson = False
) -> None:
    """Show a job's metrics, one row per epoch."""
    with connect(url, api_key, as_json) as client:
        rows = client.job_metrics(job_id)
    if as_json:
        print_json(rows)
        return
    seen = {name for row in rows for name in row.values}
    names = [name for name in METRIC_COLUMNS if name in seen]
    table = Table("epoch", *names)
    for row in rows:
        table.add_row(str(row.epoch), *(fmt(row.values.get(name), ".4f") for name in names))
    out.print(table)


# -- the student ------------------------------------------------------------------------------


@app.command()
def download(
    target: Annotated[
        str,
        typer.Argument(
            metavar="JOB_ID|fashion-mnist",
            help="a job's id: download its student from the API; fashion-mnist: fetch the "
            "builtin dataset's files from the internet into the data directory",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="file or directory (default: the server's file name)"),
    ] = None,
    format: Annotated[ArtifactFormat, typer.Option(help="what to download")] = ArtifactFormat.ONNX,
    url: Url = None,
    api_key: ApiKeyOption = None,
    as_json: AsJson = False,
) -> None:
    """Download a job's student (sha256 checked), or a builtin dataset's files."""
    if target == BuiltinDownload.FASHION_MNIST:
        from app.datasets.builtins import fashion_mnist

        data_dir = get_settings().resolved_data_dir / "fashion-mnist"
        print(f"Downloaded to {fashion_mnist.download(data_dir)}")
        return
    with connect(url, api_key, as_json) as client:
        artifact = client.download_artifact(target, output, format=format)
    if as_json:
        print_json(
            {
                "path": str(artifact.path),
                "sha256": artifact.sha256,
                "size_bytes": artifact.size_bytes,
            }
        )
        return
    out.print(f"Downloaded {artifact.path} ({megabytes(artifact.size_bytes)}, sha256 verified)")


@app.command()
def predict(
    job_id: JobId,
    inputs: Annotated[
        Path,
        typer.Argument(
            metavar="INPUTS.json",
            exists=True,
            dir_okay=False,
            help='a JSON list of samples, or {"inputs": [...]}',
        ),
    ],
    url: Url = None,
    api_key: ApiKeyOption = None,
    as_json: AsJson = False,
) -> None:
    """Classify samples with a job's student."""
    try:
        body = json.loads(inputs.read_text())
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"not JSON: {e}", param_hint="INPUTS") from None
    samples = body.get("inputs") if isinstance(body, dict) else body
    if not isinstance(samples, list):
        raise typer.BadParameter('not a list, nor {"inputs": [...]}', param_hint="INPUTS")
    with connect(url, api_key, as_json) as client:
        answer = client.predict(job_id, samples)
    if as_json:
        print_json(answer)
        return
    table = Table("sample", "prediction", "label", "probability")
    for i, (index, label, probabilities) in enumerate(
        zip(answer.predictions, answer.labels, answer.probabilities, strict=True)
    ):
        table.add_row(str(i), str(index), escape(label), f"{probabilities[index]:.4f}")
    out.print(table)


def main() -> None:
    """The ``distill`` command (exits with its status)."""
    app(prog_name="distill")


if __name__ == "__main__":
    main()
