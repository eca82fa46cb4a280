"""SQL both dialects share: the migration scripts, shipped inside the package
(`gateway/store/migrations/<dialect>/NNNN_name.sql`), and fixed literals.
"""

from __future__ import annotations

import sqlite3
from importlib import resources

from gateway.meters import COUNT_METERS, NOT_TOKENS

# The COUNT meters as an SQL list, for `IN (...)`: fixed names, not input.
COUNT_METERS_SQL = ", ".join(f"'{m}'" for m in sorted(COUNT_METERS))
# The meters a total of tokens leaves out (counts, and parts of another meter), likewise.
NOT_TOKENS_SQL = ", ".join(f"'{m}'" for m in sorted(NOT_TOKENS))


def migration_scripts(dialect: str) -> list[tuple[str, str]]:
    """(version, SQL text) of every migration of `dialect`, in order; read from the installed package."""
    folder = resources.files("gateway.store").joinpath("migrations", dialect)
    if not folder.is_dir():
        raise FileNotFoundError(f"no migrations for {dialect!r} in the gateway package")
    return sorted(
        (f.name.removesuffix(".sql"), f.read_text(encoding="utf-8"))
        for f in folder.iterdir()
        if f.name.endswith(".sql")
    )


def split_sql(script: str) -> list[str]:
    """Statements of a SQLite migration file (our migrations keep ';' and '--' out of literals). A
    trigger's body holds ';' of its own: pieces join until SQLite calls the statement complete."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    statements: list[str] = []
    pending = ""
    for piece in "\n".join(lines).split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending.strip().removesuffix(";"))
            pending = ""
    if pending.strip(" \n;"):
        statements.append(pending.strip().removesuffix(";"))
    return statements
