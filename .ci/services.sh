#!/usr/bin/env bash
# Make sure the PostgreSQL and Redis that the tests talk to are up; start them where they are
# installed locally but stopped. Point DISTILL_TEST_POSTGRES / DISTILL_TEST_REDIS elsewhere to use
# other servers (e.g. `docker compose up -d postgres redis`).
set -uo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if [ -n "${DISTILL_TEST_POSTGRES:-}" ] || pg_up; then
  echo "postgres: up"
elif command -v pg_ctlcluster >/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 30); do pg_up && break; sleep 1; done
  pg_up && echo "postgres: started" || { echo "postgres: could not start" >&2; exit 1; }
else
  echo "postgres: not running on 127.0.0.1:5432; start one or set DISTILL_TEST_POSTGRES" >&2
  exit 1
fi

if [ -n "${DISTILL_TEST_REDIS:-}" ] || redis_up; then
  echo "redis: up"
elif command -v redis-server >/dev/null; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 30); do redis_up && break; sleep 1; done
  redis_up && echo "redis: started" || { echo "redis: could not start" >&2; exit 1; }
else
  echo "redis: not running on 127.0.0.1:6379; start one or set DISTILL_TEST_REDIS" >&2
  exit 1
fi
