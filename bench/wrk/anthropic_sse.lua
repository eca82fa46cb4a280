-- Anthropic Messages, streaming: the upstream answers tests/fixtures/anthropic/stream_text.sse.
-- The fake upstream picks the stream by the `anthropic-beta: bench-sse` header (it cannot read
-- "stream": true from the body), so the gateway must forward anthropic-beta unchanged.
bench = {
   path = "/v1/messages",
   key_header = "x-api-key",
   headers = { ["anthropic-version"] = "2023-06-01", ["anthropic-beta"] = "bench-sse" },
   body = '{"max_tokens":64,"messages":[{"role":"user","content":"Hello"}],"model":"claude-sonnet-4-6","stream":true}',
}
dofile((os.getenv("BENCH_WRK_DIR") or "bench/wrk") .. "/common.lua")
