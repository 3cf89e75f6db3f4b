-- The event store: streams of domain events appended with an expected version.
--
-- weir.stream_events is in weir's publication: every append reaches weir.events through the
-- WAL (logged as kind `append`), so appended events and row changes share one gap-free order.
-- weir.streams (one row per stream: its version, its lock) and weir.stream_snapshots are not
-- in the publication: they are bookkeeping, not events.
--
-- Error codes raised here (class `WR`, ours; the Rust side maps them in `append.rs`):
--
-- | SQLSTATE | meaning | DETAIL |
-- |---|---|---|
-- | WR409 | the stream is not at the expected version | `{"stream", "expected", "actual"}` |
-- | WR400 | bad input: the message says what and how to fix it | — |
-- | WR422 | an event id is stored already, but not as this same append (a retry must resend the same events) | `{"id", "stream", "version"}` |

create table weir.streams (
    stream          text        primary key,
    version         bigint      not null default 0,    -- the last version appended (0: none)
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    deleted_at      timestamptz,                        -- soft delete: reads say unknown
    truncate_before bigint      not null default 0,     -- reads hide versions below this
    metadata        jsonb       not null default '{}'
);

create table weir.stream_events (
    stream      text        not null,
    version     bigint      not null,              -- from 1, gap-free within the stream
    id          uuid        not null unique,       -- idempotency: a retried append finds it
    type        text        not null,
    data        jsonb       not null,
    metadata    jsonb       not null default '{}',
    tags        text[]      not null default '{}',
    recorded_at timestamptz not null default now(),
    primary key (stream, version)
);

create table weir.stream_snapshots (
    stream   text        not null,
    version  bigint      not null,                  -- the stream version the state is at
    data     jsonb       not null,
    taken_at timestamptz not null default now(),
    primary key (stream, version)
);

-- Checks one append's arguments; raises WR400 naming the first problem. Returns the events'
-- ids (given or new), in the request's order.
create function weir.append_check(p_stream text, p_expected text, p_events jsonb)
returns uuid[]
language plpgsql as $$
declare
    v_ord     bigint;
    v_problem text;
    v_ids     uuid[];
    v_id      uuid;
begin
    if p_stream is null or length(p_stream) = 0 or length(p_stream) > 256 then
        raise exception 'the stream name must be 1 to 256 characters, got %',
            coalesce(quote_literal(p_stream), 'null') using errcode = 'WR400';
    end if;
    if p_expected is null
       or (p_expected not in ('any', 'no_stream', 'stream_exists') and p_expected !~ '^[0-9]{1,18}$') then
        raise exception 'expected must be any, no_stream, stream_exists or a version number, got %',
            coalesce(quote_literal(p_expected), 'null') using errcode = 'WR400';
    end if;
    if p_events is null or jsonb_typeof(p_events) <> 'array' then
        raise exception 'events must be a JSON array of {id?, type, data, metadata?, tags?}, got %',
            coalesce(jsonb_typeof(p_events), 'null') using errcode = 'WR400';
    end if;
    if jsonb_array_length(p_events) = 0 then
        raise exception 'events is empty: an append stores at least one event' using errcode = 'WR400';
    end if;
    -- One pass over the events (no statement per event): the first problem, in event order.
    select q.o, q.problem into v_ord, v_problem
      from (select x.o, case
            when jsonb_typeof(x.e) <> 'object' then
                format('event %s is a JSON %s, not an object {id?, type, data, metadata?, tags?}',
                       x.o, jsonb_typeof(x.e))
            when exists (
                    select 1 from jsonb_object_keys(x.e) k
                     where k not in ('id', 'type', 'data', 'metadata', 'tags')) then
                format('event %s has an unknown field %s; the fields are id, type, data, metadata and tags',
                       x.o, (select quote_literal(k) from jsonb_object_keys(x.e) k
                              where k not in ('id', 'type', 'data', 'metadata', 'tags') limit 1))
            when jsonb_typeof(x.e->'type') is distinct from 'string'
                 or length(x.e->>'type') = 0 or length(x.e->>'type') > 256 then
                format('event %s needs a type: a string of 1 to 256 characters', x.o)
            when not x.e ? 'data' or jsonb_typeof(x.e->'data') = 'null' then
                format('event %s (type %s) has no data; give any JSON value but null', x.o,
                       quote_literal(x.e->>'type'))
            when coalesce(jsonb_typeof(x.e->'metadata'), 'null') not in ('null', 'object') then
                format('event %s (type %s): metadata must be a JSON object, got a %s', x.o,
                       quote_literal(x.e->>'type'), jsonb_typeof(x.e->'metadata'))
            when coalesce(jsonb_typeof(x.e->'tags'), 'null') not in ('null', 'array')
                 or (jsonb_typeof(x.e->'tags') = 'array' and exists (
                        select 1 from jsonb_array_elements(x.e->'tags') t
                         where jsonb_typeof(t) <> 'string' or length(t #>> '{}') = 0)) then
                format('event %s (type %s): tags must be an array of non-empty strings', x.o,
                       quote_literal(x.e->>'type'))
            when coalesce(jsonb_typeof(x.e->'id'), 'null') not in ('null', 'string')
                 or (jsonb_typeof(x.e->'id') = 'string' and x.e->>'id' !~*
                     '^\{?[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\}?$') then
                format('event %s (type %s): id must be a UUID string, got %s', x.o,
                       quote_literal(x.e->>'type'), x.e->'id')
            end as problem
              from jsonb_array_elements(p_events) with ordinality as x(e, o)
            offset 0) q   -- evaluated once per event, not again in the filter
     where q.problem is not null
     order by q.o
     limit 1;
    if v_problem is not null then
        raise exception '%', v_problem using errcode = 'WR400';
    end if;
    select array_agg(coalesce((x.e->>'id')::uuid, gen_random_uuid()) order by x.o)
      into v_ids
      from jsonb_array_elements(p_events) with ordinality as x(e, o);
    -- A repeated id: the first event that repeats an earlier one.
    if cardinality(v_ids) > 1 then
        select u.o, u.id into v_ord, v_id
          from unnest(v_ids) with ordinality as u(id, o)
         where exists (select 1 from unnest(v_ids[1:u.o - 1]) p(id) where p.id = u.id)
         order by u.o limit 1;
        if found then
            raise exception 'event % repeats the id % of an earlier event of the same append', v_ord, v_id
                using errcode = 'WR400';
        end if;
    end if;
    return v_ids;
end
$$;

-- Appends `p_events` to `p_stream` if it is at `p_expected`; returns the stored (id, version)
-- rows in the request's order, with `duplicate` true when they were stored by an earlier call
-- (an idempotent retry) and nothing was stored now. One call is one atomic append, inside the caller's transaction
-- when there is one (the events commit with the caller's writes):
--
--   1. check the arguments (WR400);
--   2. take the stream's lock: upsert its weir.streams row, then `for update` it;
--   3. idempotency, before the expected version (a retry's expected version is stale): when
--      every id is stored already, in this stream, consecutively and in this order, return the
--      stored versions and store nothing; when only some are, or elsewhere, raise WR422;
--   4. check the expected version (WR409); a deleted stream counts as absent;
--   5. insert the events at the next versions and move the stream's version.
create function weir.append(p_stream text, p_expected text, p_events jsonb)
returns table (id uuid, version bigint, duplicate boolean)
language plpgsql as $$
#variable_conflict use_column
declare
    v_ids      uuid[];
    v_n        int;
    v_current  bigint;
    v_deleted  timestamptz;
    v_stored   int;
    v_first    bigint;
    v_bad      record;
    v_effective bigint;
    v_exact    bigint;
begin
    v_ids := weir.append_check(p_stream, p_expected, p_events);
    v_n := cardinality(v_ids);

    -- The stream's lock and its next version in one statement: the update waits for a
    -- concurrent append of the stream and sees its version (it is undone below for a retry,
    -- and by the error for a wrong expected version). A new stream's row is made first (a
    -- concurrent first append waits on the insert, then finds the row).
    update weir.streams s set version = s.version + v_n, updated_at = now()
     where s.stream = p_stream
    returning s.version - v_n, s.deleted_at into v_current, v_deleted;
    if not found then
        insert into weir.streams as s (stream) values (p_stream) on conflict (stream) do nothing;
        update weir.streams s set version = s.version + v_n, updated_at = now()
         where s.stream = p_stream
        returning s.version - v_n, s.deleted_at into v_current, v_deleted;
    end if;

    -- Idempotency: which of the ids are stored, and where.
    select count(*)::int, min(e.version) into v_stored, v_first
      from weir.stream_events e where e.id = any(v_ids);
    if v_stored > 0 then
        select u.id, e.stream, e.version, u.ord into v_bad
          from unnest(v_ids) with ordinality as u(id, ord)
          left join weir.stream_events e on e.id = u.id
         where e.id is null or e.stream <> p_stream or e.version <> v_first + u.ord - 1
         order by u.ord limit 1;
        if found then
            if v_bad.stream is null then
                -- This id is new but others of the request are stored: name a stored one.
                select e.id, e.stream, e.version into v_bad
                  from weir.stream_events e where e.id = any(v_ids) order by e.stream, e.version limit 1;
            end if;
            raise exception 'event id % is stored already (stream %, version %) but this append is not a retry of the one that stored it; a retry must resend the same events in the same order, and new events need new ids',
                v_bad.id, quote_literal(v_bad.stream), v_bad.version
                using errcode = 'WR422',
                      detail = jsonb_build_object('id', v_bad.id, 'stream', v_bad.stream, 'version', v_bad.version)::text;
        end if;
        -- A retry: nothing is stored, the version stays.
        update weir.streams s set version = v_current where s.stream = p_stream;
        return query select u.id, v_first + u.ord - 1, true
                       from unnest(v_ids) with ordinality as u(id, ord) order by u.ord;
        return;
    end if;

    -- The expected version. A deleted stream counts as absent (version 0).
    v_effective := case when v_deleted is null then v_current else 0 end;
    if p_expected ~ '^[0-9]+$' then
        v_exact := p_expected::bigint;
    end if;
    if p_expected = 'stream_exists' and v_deleted is not null then
        raise exception 'stream % was deleted; append with expected any or no_stream to start it again',
            quote_literal(p_stream) using errcode = 'WR400';
    end if;
    if (p_expected = 'no_stream' and v_effective <> 0)
       or (p_expected = 'stream_exists' and v_effective = 0)
       or v_exact <> v_effective then
        raise exception 'stream % is at %, but the append expected %', quote_literal(p_stream),
            case when v_effective = 0 then 'no_stream' else v_effective::text end, p_expected
            using errcode = 'WR409',
                  detail = jsonb_build_object(
                      'stream', p_stream, 'expected', p_expected,
                      'actual', case when v_effective = 0 then 'no_stream' else v_effective::text end)::text;
    end if;

    insert into weir.stream_events (stream, version, id, type, data, metadata, tags)
    select p_stream, v_current + x.o, v_ids[x.o], x.e->>'type', x.e->'data',
           coalesce(nullif(x.e->'metadata', 'null'::jsonb), '{}'::jsonb),
           coalesce(array(select jsonb_array_elements_text(nullif(x.e->'tags', 'null'::jsonb))), '{}')
      from jsonb_array_elements(p_events) with ordinality as x(e, o)
     order by x.o;

    if v_deleted is not null then
        -- Appending again after a soft delete starts the stream again (older events stay hidden).
        update weir.streams s set deleted_at = null where s.stream = p_stream;
    end if;

    return query select u.id, v_current + u.ord, false
                   from unnest(v_ids) with ordinality as u(id, ord) order by u.ord;
end
$$;

-- The same with the expected version as a number (0 = no_stream).
create function weir.append(p_stream text, p_expected bigint, p_events jsonb)
returns table (id uuid, version bigint, duplicate boolean)
language sql as $$
    select * from weir.append(p_stream, p_expected::text, p_events)
$$;
