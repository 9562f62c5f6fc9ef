"""Storage: the SQL job store (SQLAlchemy) and the DuckDB results store."""
