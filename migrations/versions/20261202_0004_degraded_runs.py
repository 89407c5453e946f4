"""degraded runs, and runs counted in the metrics

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.add_column(sa.Column("degraded", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("counted_at", sa.DateTime(), nullable=True))
        # Workers look for the runs not counted yet every few seconds: the history must not be scanned.
        batch.create_index(batch.f("ix_sync_runs_counted_at"), ["counted_at"], unique=False)
    # Runs closed before this revision are history: the metrics start with the runs closed after it.
    runs = sa.table("sync_runs", sa.column("finished_at", sa.DateTime()), sa.column("counted_at", sa.DateTime()))
    op.execute(runs.update().where(runs.c.finished_at.is_not(None)).values(counted_at=runs.c.finished_at))


def downgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.drop_index(batch.f("ix_sync_runs_counted_at"))
        batch.drop_column("counted_at")
        batch.drop_column("degraded")
