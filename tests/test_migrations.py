"""The Alembic history builds exactly the tables the models describe, and can be walked back."""

from alembic import command

from app.cli import alembic_config
from app.db import get_engine
from tests.conftest import Stack


def test_migrations_match_models(stack: Stack) -> None:
    command.check(alembic_config())  # raises if autogenerate would find any difference


def test_downgrade_and_upgrade_again(stack: Stack) -> None:
    config = alembic_config()
    command.downgrade(config, "base")
    get_engine().dispose()
    command.upgrade(config, "head")
    command.check(config)
