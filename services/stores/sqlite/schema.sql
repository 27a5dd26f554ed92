-- The embedded store's schema, version 6 (store.py explains every table). Every statement is
-- IF NOT EXISTS, so the store runs this file on every open, then upgrades an older file. No
-- semicolon may appear in a comment: the store splits the file into statements at them.
CREATE TABLE IF NOT EXISTS due (
    shard INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    task_rowid INTEGER NOT NULL,
    gen INTEGER NOT NULL,
    due_ms INTEGER NOT NULL,
    PRIMARY KEY (shard, bucket, task_rowid, gen)
) WITHOUT ROWID;

-- Due rows of new tasks due a few minutes ahead or more, until the promoter moves them to
-- ``due`` (see store.py): clustered by far bucket and then insertion order.
CREATE TABLE IF NOT EXISTS due_far (
    far_bucket INTEGER NOT NULL,
    task_rowid INTEGER NOT NULL,
    gen INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    due_ms INTEGER NOT NULL,
    PRIMARY KEY (far_bucket, task_rowid, gen)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS ended (
    due_ms INTEGER NOT NULL,
    task_rowid INTEGER NOT NULL,
    state INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    PRIMARY KEY (due_ms, task_rowid)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT NOT NULL UNIQUE,
    shard INTEGER NOT NULL,
    queue TEXT NOT NULL,
    payload BLOB NOT NULL,
    fire_at_ms INTEGER NOT NULL,
    due_ms INTEGER NOT NULL,
    state INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    gen INTEGER NOT NULL,
    headers TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    lease_ms INTEGER NOT NULL,
    traceparent TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    last_error TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idem ON tasks (queue, idempotency_key)
    WHERE idempotency_key != '';
CREATE TABLE IF NOT EXISTS checkpoints (
    shard INTEGER PRIMARY KEY,
    ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS shard_leases (
    shard INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    node_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    roles TEXT NOT NULL,
    queues TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS state_counts (
    state INTEGER PRIMARY KEY,
    n INTEGER NOT NULL
);
