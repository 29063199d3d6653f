"""``distill``: run the whole service embedded (``up``) or its parts separately (server mode)."""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import get_settings
from app.queue import CONTROL_QUEUE, QUEUE

if TYPE_CHECKING:
    from alembic.config import Config


def alembic_config() -> "Config":
    from alembic.config import Config

    # A source checkout has alembic.ini beside app/; an installed image runs from its directory.
    checkout = Path(__file__).resolve().parent.parent
    root = checkout if (checkout / "alembic.ini").exists() else Path.cwd()
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    return config


def migrate() -> None:
    from alembic import command

    command.upgrade(alembic_config(), "head")


def worker_command(
    concurrency: int, beat: bool, queues: str = f"{QUEUE},{CONTROL_QUEUE}"
) -> list[str]:
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


def up(host: str, port: int) -> int:
    """Migrate, then run the API and one worker (with the recovery schedule) until Ctrl-C,
    restarting either if it dies: the worker's recovery schedule is what requeues a job whose
    process was killed, so it must not stay dead unnoticed."""
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

    signal.signal(signal.SIGTERM, stop)
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
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("up", "migrate, then run API and worker together"),
        ("api", "run the API"),
        ("serve", "serve students only: Open Inference Protocol v2, /predict, health"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
    serve_parser = p
    serve_parser.add_argument(
        "--workers", type=int, default=1, help="server processes (each loads its own models)"
    )
    p = sub.add_parser("worker", help="run a Celery worker")
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="jobs at once on this host (all on DISTILL_DEVICE)",
    )
    p.add_argument("--beat", action="store_true", help="also run the recovery schedule")
    p.add_argument(
        "--queues",
        default=f"{QUEUE},{CONTROL_QUEUE}",
        help=f"{QUEUE}: training jobs; {CONTROL_QUEUE}: recovery of jobs whose worker died",
    )
    sub.add_parser("migrate", help="bring the database schema up to date")
    p = sub.add_parser("download", help="download a builtin dataset (needs internet)")
    p.add_argument("dataset", choices=["fashion-mnist"])
    args = parser.parse_args(argv)

    if args.command == "up":
        return up(args.host, args.port)
    if args.command == "api":
        os.execv(sys.executable, api_command(args.host, args.port))
    if args.command == "serve":
        command = api_command(args.host, args.port)
        command[command.index("app.main:create_app")] = "app.serving.app:create_serving_app"
        command += ["--workers", str(args.workers)]
        os.execv(sys.executable, command)
    if args.command == "worker":
        os.execv(sys.executable, worker_command(args.concurrency, args.beat, args.queues))
    if args.command == "migrate":
        migrate()
        return 0
    from app.datasets.builtins import fashion_mnist

    target = get_settings().resolved_data_dir / "fashion-mnist"
    print(f"Downloaded to {fashion_mnist.download(target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
