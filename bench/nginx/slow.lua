-- Slow-upstream mode (bench/run.py --slow), loaded by init_by_lua_block.
-- Streams follow an absolute schedule (event i at start + i * gap), so nginx's timer overshoot
-- does not add up over the 30 gaps: a 31-event stream takes 600 ms, not 30 x (20 ms + slack).

local M = {}

function M.json(body, delay)
   ngx.req.discard_body()
   ngx.sleep(delay)
   ngx.header["Content-Length"] = #body
   ngx.print(body)
end

function M.stream(events, gap)
   ngx.req.discard_body()
   ngx.update_time()
   local start = ngx.now()
   for i, event in ipairs(events) do
      if i > 1 then
         ngx.update_time()
         local wait = start + (i - 1) * gap - ngx.now()
         if wait > 0 then
            ngx.sleep(wait)
         end
      end
      ngx.print(event)
      ngx.flush(false) -- one event, one write
   end
end

return M
