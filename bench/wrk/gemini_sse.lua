-- Gemini streamGenerateContent?alt=sse: the upstream answers
-- tests/fixtures/gemini/stream_generate_content.sse (CRLF framing).
bench = {
   path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
   key_header = "x-goog-api-key",
   headers = {},
   body = '{"contents": [{"parts": [{"text": "Hello"}], "role": "user"}]}',
}
dofile((os.getenv("BENCH_WRK_DIR") or "bench/wrk") .. "/common.lua")
