-- Consumers (operators, later subscriptions), their lanes' checkpoints and leases, failures,
-- parked events, and the processes that share lanes.

create table weir.consumers (
    name            text primary key,
    lanes           int  not null,
    ordering        text not null,               -- global | per_key
    entities        text[] not null,             -- what it listens to (process status)
    kinds           text[] not null,
    state           text not null default 'running',   -- running | halted
    halted_lane     int,
    halted_position bigint,
    halted_attempt  int,
    halted_error    text,
    halted_at       timestamptz,
    created_at      timestamptz not null default now()
);

-- One row per lane. `position`: every event routed to this lane at or below it is handled.
-- A transactional handler updates it in its own transaction, fenced by (owner, fence): a
-- process that lost the lease cannot commit a checkpoint.
create table weir.checkpoints (
    consumer         text   not null references weir.consumers (name) on delete cascade,
    lane             int    not null,
    position         bigint not null,
    status           text   not null default 'idle',   -- running | retrying | idle | halted
    current_position bigint,
    attempt          int    not null default 0,
    last_error       text,
    owner            text,
    lease_until      timestamptz,
    fence            bigint not null default 0,
    updated_at       timestamptz not null default now(),
    primary key (consumer, lane)
);

create table weir.consumer_failures (
    id       bigserial primary key,
    consumer text   not null,
    lane     int    not null,
    position bigint not null,
    attempt  int    not null,
    error    text   not null,
    outcome  text   not null,        -- retry | halt | skip | park
    at       timestamptz not null default now()
);

create table weir.parked (
    consumer        text   not null,
    position        bigint not null,
    lane            int    not null,
    partition_key   text   not null,
    entity          text   not null,
    error           text   not null,
    attempts        int    not null,
    retry_requested bool   not null default false,
    parked_at       timestamptz not null default now(),
    primary key (consumer, position)
);
create index parked_key on weir.parked (consumer, partition_key);

-- Processes running consumers; lanes are shared fairly among the live ones.
create table weir.consumer_nodes (
    node         text primary key,
    heartbeat_at timestamptz not null default now()
);
