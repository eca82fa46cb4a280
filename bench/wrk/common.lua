-- Shared by the per-cell scripts: each sets the global `bench` table, then loads this file.
-- Environment (set by bench/run.py):
--   BENCH_PREFIX       path prefix of the contender ("" direct, "/anthropic" or "/gemini")
--   BENCH_KEY          the key sent in bench.key_header (a gateway key, or a dummy one)
--   BENCH_EXPECT_FILE  the exact body the client must receive (decoded from chunked)
-- A response counts as good only when it is a 200 whose body equals the expected bytes;
-- done() prints one line `BENCH_RESULT {json}` that bench/run.py parses.

wrk.method = "POST"
wrk.path = (os.getenv("BENCH_PREFIX") or "") .. bench.path
wrk.body = bench.body
wrk.headers["Content-Type"] = "application/json"
wrk.headers[bench.key_header] = os.getenv("BENCH_KEY") or "bench"
for name, value in pairs(bench.headers or {}) do
   wrk.headers[name] = value
end

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   ok, bad_status, bad_body = 0, 0, 0
   local path = os.getenv("BENCH_EXPECT_FILE")
   if path and path ~= "" then
      local f = assert(io.open(path, "rb"))
      expected = f:read("*a")
      f:close()
   end
end

function response(status, headers, body)
   if status ~= 200 then
      bad_status = bad_status + 1
   elseif expected ~= nil and body ~= expected then
      bad_body = bad_body + 1
   else
      ok = ok + 1
   end
end

function done(summary, latency, requests)
   local good, st, bb = 0, 0, 0
   for _, thread in ipairs(threads) do
      good = good + thread:get("ok")
      st = st + thread:get("bad_status")
      bb = bb + thread:get("bad_body")
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"ok":%d,"bad_status":%d,"bad_body":%d,"requests":%d,"duration_us":%d,'
         .. '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
         .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%d}\n',
      good, st, bb, summary.requests, summary.duration,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
