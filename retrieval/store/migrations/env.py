"""Alembic environment: always run on the connection a Store hands over (SQLite or PostgreSQL)."""

from alembic import context

from retrieval.store.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  # SQLite alters tables by copying them; PostgreSQL alters them in place
                  render_as_batch=connection.dialect.name == "sqlite",
                  transaction_per_migration=True)  # each revision commits on its own
with context.begin_transaction():
    context.run_migrations()
