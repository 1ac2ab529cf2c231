"""Alembic environment: always run on the connection a Store hands over."""

from alembic import context

from retrieval.store.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=True,  # SQLite alters tables by copying them
                  transaction_per_migration=True)  # each revision commits on its own
with context.begin_transaction():
    context.run_migrations()
