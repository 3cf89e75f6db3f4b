-- Queue limits that hold across processes: a global concurrency (running jobs of the queue,
-- all processes together) and a rate (jobs started per period, in any period-long window).
-- Only the claims of limited queues (`[jobs.limits.<queue>]`) come here; every other queue
-- keeps the one-statement claim of 0001 and its speed.
--
-- One row per limited queue, locked by each claim of the queue (`for update`): claims of one
-- limited queue are serialised, claims of other queues never wait on it. The row keeps what the
-- limits need, so a claim never scans weir.jobs to count:
--   running  ids of jobs this queue's limited claims started; each claim first keeps only the
--            ids still running (primary key look-ups, at most global_concurrency of them), so
--            jobs that finished, failed, were rescued or cancelled leave it by themselves;
--   starts   the start times of the last period, oldest first: a sliding-window log, exact
--            ("at most rate starts in any period-long window"), at most `rate` entries.
create table weir.job_queue_limits (
    queue   text primary key,
    running bigint[] not null default '{}',
    starts  timestamptz[] not null default '{}'
);

-- Claims up to p_demand available jobs of p_queue (kinds p_kinds) for p_process within the
-- queue's limits (a null limit is no limit). plpgsql, not one statement, because of snapshots:
-- in READ COMMITTED each statement below sees what committed before it ran, so after waiting
-- for the limit row the count sees the jobs the claim before ours started. (One statement
-- keeps the snapshot it started with and would count them as not running.)
-- p_after is not read: passing the caller's completions (`(select count(*) from done)`) makes
-- them run first, so jobs completed in the same statement no longer count as running.
create function weir.claim_limited(
    p_queue       text,
    p_kinds       text[],
    p_demand      int,
    p_process     text,
    p_concurrency int,
    p_rate        int,
    p_period_secs double precision,
    p_after       bigint
) returns table (
    id           bigint,
    queue        text,
    kind         text,
    args         jsonb,
    attempt      int,
    max_attempts int,
    timeout_ms   int,
    created_at   timestamptz,
    wait_us      bigint
)
language plpgsql as $$
#variable_conflict use_column
declare
    v_running bigint[];
    v_starts  timestamptz[];
    v_room    int := p_demand;
    v_now     timestamptz;
    v_claimed bigint[] := '{}';
    v_kept    int;
    r         record;
begin
    select l.running, l.starts into v_running, v_starts
      from weir.job_queue_limits l where l.queue = p_queue
       for update;
    if not found then
        insert into weir.job_queue_limits (queue) values (p_queue) on conflict do nothing;
        select l.running, l.starts into v_running, v_starts
          from weir.job_queue_limits l where l.queue = p_queue
           for update;
    end if;
    -- After the wait: the time of these starts, not of the statement (now()).
    v_now := clock_timestamp();
    v_kept := cardinality(v_running) + cardinality(v_starts);
    select coalesce(array_agg(j.id), '{}') into v_running
      from weir.jobs j where j.id = any(v_running) and j.state = 'running';
    if p_concurrency is not null then
        v_room := least(v_room, greatest(0, p_concurrency - cardinality(v_running)));
    end if;
    if p_rate is not null then
        select coalesce(array_agg(s order by s), '{}') into v_starts
          from unnest(v_starts) s where s > v_now - make_interval(secs => p_period_secs);
        v_room := least(v_room, greatest(0, p_rate - cardinality(v_starts)));
    else
        v_starts := '{}';
    end if;
    if v_room > 0 then
        for r in
            with next as (
                select j.id from weir.jobs j
                 where j.state = 'available' and j.queue = p_queue and j.kind = any(p_kinds)
                 order by j.priority, j.scheduled_at, j.id
                 limit v_room
                 for update skip locked
            )
            update weir.jobs j
               set state = 'running', attempt = j.attempt + 1, attempted_at = v_now,
                   attempted_by = p_process
              from next
             where j.id = next.id
         returning j.id, j.queue, j.kind, j.args, j.attempt, j.max_attempts, j.timeout_ms,
                   j.created_at,
                   greatest(0, (extract(epoch from v_now - j.scheduled_at) * 1000000))::bigint
                       as wait_us
        loop
            v_claimed := v_claimed || r.id;
            id := r.id; queue := r.queue; kind := r.kind; args := r.args; attempt := r.attempt;
            max_attempts := r.max_attempts; timeout_ms := r.timeout_ms;
            created_at := r.created_at; wait_us := r.wait_us;
            return next;
        end loop;
    end if;
    -- Written only when something changed: an idle poll of a limited queue writes nothing.
    if cardinality(v_claimed) > 0 or cardinality(v_running) + cardinality(v_starts) < v_kept then
        update weir.job_queue_limits l
           set running = v_running || v_claimed,
               starts = v_starts || array_fill(v_now, array[cardinality(v_claimed)])
         where l.queue = p_queue;
    end if;
end
$$;
