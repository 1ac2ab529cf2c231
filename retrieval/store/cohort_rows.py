"""The saved-cohorts tables of a store's database: write one cohort whole, read, delete."""

from __future__ import annotations

from sqlalchemy import delete, func, select

from .rows import Rows
from .schema import CohortMemberRow, CohortRow


class CohortRows:
    """Cohorts in the store's database. Writes are one transaction each (a kill leaves the old
    cohort or the new one, never a mix); the caller holds the store's writer lock."""

    def __init__(self, db: Rows) -> None:
        self.db = db

    def save(self, name: str, kind: str, created: str, refreshed: str | None,
             provenance: str, members: list[tuple[int, float | None]]) -> None:
        """Create or replace ``name`` with ``members`` ((image id, score) in rank order)."""
        with self.db.transaction() as session:
            row = session.scalar(select(CohortRow).where(CohortRow.name == name))
            if row is None:
                row = CohortRow(name=name, kind=kind, created=created, provenance=provenance)
                session.add(row)
                session.flush()
            else:
                row.kind, row.provenance = kind, provenance
                session.execute(delete(CohortMemberRow).where(CohortMemberRow.cohort_id == row.id))
            row.refreshed = refreshed
            session.add_all(CohortMemberRow(cohort_id=row.id, rank=rank, image_id=int(image_id),
                                            score=None if score is None else float(score))
                            for rank, (image_id, score) in enumerate(members, 1))

    def names(self) -> list[dict]:
        """Every cohort's name, kind, dates and member count, by name."""
        with self.db.engine.connect() as conn:
            rows = conn.execute(select(CohortRow.id, CohortRow.name, CohortRow.kind,
                                       CohortRow.created, CohortRow.refreshed)
                                .order_by(CohortRow.name)).all()
            sizes = dict(conn.execute(select(CohortMemberRow.cohort_id, func.count())
                                      .group_by(CohortMemberRow.cohort_id)).all())
        return [{"name": r.name, "kind": r.kind, "count": sizes.get(r.id, 0),
                 "created": r.created, "refreshed": r.refreshed} for r in rows]

    def get(self, name: str) -> dict | None:
        """``name``'s row and members ((id, score) in rank order), or None."""
        with self.db.engine.connect() as conn:
            row = conn.execute(select(CohortRow).where(CohortRow.name == name)).first()
            if row is None:
                return None
            members = conn.execute(select(CohortMemberRow.image_id, CohortMemberRow.score)
                                   .where(CohortMemberRow.cohort_id == row.id)
                                   .order_by(CohortMemberRow.rank)).all()
        return {"name": row.name, "kind": row.kind, "created": row.created,
                "refreshed": row.refreshed, "provenance": row.provenance,
                "members": [(int(i), s) for i, s in members]}

    def delete(self, name: str) -> bool:
        with self.db.transaction() as session:
            row = session.scalar(select(CohortRow).where(CohortRow.name == name))
            if row is None:
                return False
            session.execute(delete(CohortMemberRow).where(CohortMemberRow.cohort_id == row.id))
            session.delete(row)
        return True


def purge_members(session, image_ids: list[int]) -> int:
    """Remove ``image_ids`` from every saved cohort inside the caller's transaction (withdrawn
    consent: `forget` leaves no membership behind); returns the memberships removed."""
    removed = 0
    ids = [int(i) for i in image_ids]
    for start in range(0, len(ids), 500):
        result = session.execute(delete(CohortMemberRow)
                                 .where(CohortMemberRow.image_id.in_(ids[start:start + 500])))
        removed += result.rowcount or 0
    return removed
