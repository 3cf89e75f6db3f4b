-- Subscriptions: consumers kept in the database, so every process sees them. The consumer row
-- (weir.consumers, kind 'subscription') holds the emitters (its lanes), their checkpoints,
-- state and failures; this row holds what only a subscription has.
create table weir.subscriptions (
    id          uuid        primary key default gen_random_uuid(),
    name        text        not null unique references weir.consumers (name) on delete cascade,
    type        text        not null,   -- stream | event_type | event_pattern | event_payload | tags | entity
    selector    jsonb       not null,
    options     jsonb       not null default '{}',   -- retry, on_exhausted, partition_by
    sink        text        not null default 'client',   -- client | rust
    start_from  jsonb       not null,   -- as created: "beginning" | "now" | a position | a time
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now()
);
