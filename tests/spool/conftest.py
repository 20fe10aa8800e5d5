"""Fixtures of the spool tests: the throwaway PostgreSQL cluster (``tests/support/pg.py``)."""

from tests.support.pg import pg_cluster, pg_url

__all__ = ["pg_cluster", "pg_url"]
