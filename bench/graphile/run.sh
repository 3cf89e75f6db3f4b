#!/usr/bin/env bash
# graphile-worker, the reference of `weir-bench jobs`: installs it from npm (once, into a cache
# directory outside the repository) and drains JOBS no-op jobs with CONCURRENCY workers.
#
#   bench/graphile/run.sh DATABASE_URL JOBS CONCURRENCY [defaults|tuned] [noop|sql|URL]
#
# TASK (default noop): `sql` inserts each job's `n` into bench_out (which must exist); a URL
# gets each job POSTed to it.
# Prints one JSON line: {"mode", "task", "jobs", "concurrency", "enqueue_per_sec", "jobs_per_sec"}.
# `defaults` is graphile-worker as installed; `tuned` adds its documented performance options
# (a local queue of 500 jobs, batched completions).
# Needs node >= 20 and npm. WEIR_BENCH_CACHE overrides the install directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${WEIR_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/weir-bench}/graphile
mkdir -p "$cache"
cp "$here/bench.mjs" "$cache/bench.mjs"
if ! cmp -s "$here/package.json" "$cache/package.json" || [ ! -d "$cache/node_modules/graphile-worker" ]; then
  cp "$here/package.json" "$cache/package.json"
  (cd "$cache" && npm install --no-audit --no-fund --loglevel=error >&2)
fi
exec node "$cache/bench.mjs" "$@"
