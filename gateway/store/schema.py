"""Migration scripts, shipped inside the package (`gateway/store/migrations/<dialect>/NNNN_name.sql`)."""

from __future__ import annotations

from importlib import resources


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
    """Statements of a migration file (our migrations keep ';' out of literals and comments)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
