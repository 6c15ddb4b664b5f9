"""Drop an MLflow run's metric values after a step: what a resumed run does to the values its
interrupted process logged after the checkpoint, before logging them again (recomputed).

MLflow's client has no call that deletes metric values (a history only grows; a value logged again
at a step is a second point there). A database store (the SQLite default in out_dir, PostgreSQL,
MySQL) is MLflow's own SQLAlchemy store, so the values go through its session and models: every
value at a later step, then each key's "latest" row (what ``search_runs`` shows) recomputed from
the values left, by MLflow's rule (highest step, then timestamp, then value). Any other store (a
tracking server, a file store) cannot be edited from here: one line says the orphans stay.
"""

from __future__ import annotations

from typing import Any, Optional


def rewind(client: Any, run_id: str, step: int) -> Optional[str]:
    """Delete the run's metric values at steps after ``step``; a warning line if the store cannot."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if not isinstance(store, SqlAlchemyStore):
        return (
            f"MLflow store {client.tracking_uri} cannot be rewound: the values run {run_id} logged "
            f"after step {step} before it was interrupted stay beside the recomputed ones"
        )
    try:
        writing = store.ManagedSessionMaker(read_only=False)  # MLflow 3.x: sessions are read-only unless asked
    except TypeError:
        writing = store.ManagedSessionMaker()
    with writing as session:
        mine = session.query(SqlMetric).filter(SqlMetric.run_uuid == run_id)
        if mine.filter(SqlMetric.step > step).delete(synchronize_session=False) == 0:
            return None  # nothing after the checkpoint: the latest rows stand
        latest: dict[str, Any] = {}
        for m in mine.all():
            best = latest.get(m.key)
            if best is None or (m.step, m.timestamp, m.value) > (best.step, best.timestamp, best.value):
                latest[m.key] = m
        session.query(SqlLatestMetric).filter(SqlLatestMetric.run_uuid == run_id).delete(synchronize_session=False)
        session.add_all(
            SqlLatestMetric(
                key=m.key, value=m.value, timestamp=m.timestamp, step=m.step, is_nan=m.is_nan, run_uuid=run_id
            )
            for m in latest.values()
        )
    return None
