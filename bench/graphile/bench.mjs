// Drains JOBS jobs with graphile-worker at CONCURRENCY; see run.sh. TASK is what each job
// does: `noop`, `sql` (inserts its `n` into bench_out with its own query) or an http URL
// (POSTs its payload there, as weir's http worker does).
import { performance } from "node:perf_hooks";
import pg from "pg";
import { Logger, run, runMigrations } from "graphile-worker";

const [url, jobsArg, concurrencyArg, mode = "defaults", task = "noop"] = process.argv.slice(2);
if (!url || !jobsArg || !concurrencyArg) {
  console.error("usage: bench.mjs DATABASE_URL JOBS CONCURRENCY [defaults|tuned] [noop|sql|URL]");
  process.exit(2);
}
const jobs = Number(jobsArg);
const concurrency = Number(concurrencyArg);
const logger = new Logger(() => () => {});
const preset =
  mode === "tuned"
    ? { worker: { localQueue: { size: 500 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 } }
    : { worker: {} };

const pool = new pg.Pool({ connectionString: url, max: concurrency + 4 });
pool.on("error", (e) => console.error("pool error:", e.message));
await runMigrations({ pgPool: pool, logger });
await pool.query("truncate graphile_worker._private_jobs, graphile_worker._private_job_queues cascade");

// Enqueue in batches of 5000 with graphile-worker's own bulk function.
const t0 = performance.now();
for (let left = jobs; left > 0; left -= 5000) {
  const n = Math.min(5000, left);
  await pool.query(
    `select graphile_worker.add_jobs(array(
       select json_populate_record(null::graphile_worker.job_spec,
                json_build_object('identifier', 'bench', 'payload', json_build_object('n', $2::int + g)))
         from generate_series(1, $1) g))`,
    [n, jobs - left],
  );
}
const enqueueSecs = (performance.now() - t0) / 1000;

const tasks = {
  noop: async () => {},
  sql: async (payload, helpers) => {
    await helpers.withPgClient((client) =>
      client.query("insert into bench_out (job_id) values ($1)", [payload.n]),
    );
  },
  http: async (payload) => {
    const res = await fetch(task, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(payload),
    });
    if (!res.ok) throw new Error(`http ${res.status}`);
    await res.arrayBuffer();
  },
};

let done = 0;
let finish;
const finished = new Promise((resolve) => (finish = resolve));
const t1 = performance.now();
const runner = await run({
  pgPool: pool,
  concurrency,
  noHandleSignals: true,
  pollInterval: 1000,
  logger,
  preset,
  taskList: { bench: tasks[task === "noop" || task === "sql" ? task : "http"] },
});
runner.events.on("job:complete", () => {
  if (++done === jobs) finish();
});
await finished;
// Completions may be batched: wait until the table is really empty.
for (;;) {
  const { rows } = await pool.query("select count(*)::int as n from graphile_worker._private_jobs");
  if (rows[0].n === 0) break;
  await new Promise((r) => setTimeout(r, 5));
}
const drainSecs = (performance.now() - t1) / 1000;
await runner.stop();
await pool.end();
console.log(
  JSON.stringify({
    mode,
    task,
    jobs,
    concurrency,
    enqueue_per_sec: jobs / enqueueSecs,
    jobs_per_sec: jobs / drainSecs,
  }),
);
