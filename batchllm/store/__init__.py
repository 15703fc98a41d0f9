"""The SQL store: the only package that knows SQL, tables and sessions.

Everything else calls the named functions of its modules — ``batches`` (create, read, cancel, retry, expire),
``leases`` (claim, renew, release, reap), ``results`` (fenced writes, export), ``dispatch`` (chunks that need
a message), ``workers`` (unique names, heartbeats, assignments), ``leader`` (the one active scheduler),
``cluster`` (aggregates for scheduling and metrics), ``schedules`` (nightly runs) and ``db`` (engines, the
database clock, migrations). Times come from the database's clock, never a host's.
"""
