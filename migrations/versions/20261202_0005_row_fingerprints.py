"""row fingerprints: a full sync skips building the contacts whose source row is unchanged

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Empty for the customers synced before: their next full sync builds them once and records it.
    with op.batch_alter_table("customer_sync_state") as batch:
        batch.add_column(sa.Column("source_fingerprint", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("customer_sync_state") as batch:
        batch.drop_column("source_fingerprint")
