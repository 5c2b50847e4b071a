-- wrk script: counts responses that ask the client to reconnect
-- (Connection: close) and non-2xx statuses, per thread, summed at the end.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  closes = 0
  non2xx = 0
end

function response(status, headers, body)
  local c = headers["Connection"] or headers["connection"]
  if c ~= nil and string.lower(c) == "close" then
    closes = closes + 1
  end
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local c, n = 0, 0
  for _, t in ipairs(threads) do
    c = c + t:get("closes")
    n = n + t:get("non2xx")
  end
  io.write(string.format("BATON closes=%d non2xx=%d\n", c, n))
end
