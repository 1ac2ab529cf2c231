"""The store's schema is managed by Alembic, and the revisions match the models."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine

from retrieval.store import migrations
from retrieval.errors import StoreError
from retrieval.store.schema import Base
from retrieval.store import Manifest, NewImage, Store


def test_revisions_build_exactly_the_models(tmp_path):
    """Fails when schema.py changes without a new revision in retrieval/migrations/versions."""
    engine = create_engine(f"sqlite:///{tmp_path / 'm.sqlite'}")
    migrations.upgrade(engine)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []
    assert migrations.current(engine) == migrations.head()
    from retrieval.store.revision import HEAD, stored_revision

    assert HEAD == migrations.head()  # a new revision updates the fast check's HEAD too
    assert stored_revision(engine) == HEAD


def _manifest() -> Manifest:
    return Manifest(model="m", model_revision="local", model_fingerprint="f", dim=4,
                    preprocessing_version="v1")


def test_a_store_made_before_alembic_is_adopted(tmp_path):
    """An early store (tables from create_all, no alembic_version) is stamped, data kept."""
    root = tmp_path / "store"
    store = Store.create(root, _manifest())
    with store.writer() as w:
        w.add_file(path="/a.png", size=1, mtime_ns=1, content_hash="h", source_kind="image",
                   images=[NewImage(0, 2, 2, np.array([1, 0, 0, 0], np.float32))])
    store.close()
    with sqlite3.connect(root / "meta.sqlite") as con:
        con.execute("DROP TABLE alembic_version")
    with pytest.raises(StoreError, match="schema upgrade"):
        Store.open(root, readonly=True)  # a reader never writes the schema
    reopened = Store.open(root)
    assert reopened.count == 1
    assert migrations.current(reopened.engine) == migrations.head()
    assert Store.open(root, readonly=True).count == 1
