-- Adds compacted hour cells to the running totals (worker.rollups, worker.cells).
-- METRICS (the metric names, in worker.rollups' order) is defined above this line.
-- KEYS: every hash the blocks below name, by index. ARGV: one block per cell:
--   't', totals index key, cell key, cell id, dims, amounts
-- amounts: (metric number, amount) pairs packed as little-endian (uint8, double), 'n' (the
-- outcomes) first, which every cell has: a cell without it is new and joins the index.
-- Amounts stay below 2^53 (Lua numbers are doubles), which redis.call writes back as exact
-- integers.
local formats = {}
local i = 1
while i <= #ARGV do
  if ARGV[i] ~= 't' then
    return redis.error_reply('rollup totals: unknown block ' .. tostring(ARGV[i]))
  end
  local cell, blob = KEYS[tonumber(ARGV[i + 2])], ARGV[i + 5]
  local n = #blob / 9
  formats[n] = formats[n] or '<' .. string.rep('Bd', n)
  local raw, fields = {struct.unpack(formats[n], blob)}, {}
  for k = 1, n do fields[k] = METRICS[raw[2 * k - 1] + 1] end
  local cur, out = redis.call('HMGET', cell, unpack(fields)), {}
  for k = 1, n do
    out[2 * k - 1] = fields[k]
    out[2 * k] = (cur[k] or 0) + raw[2 * k]
  end
  redis.call('HSET', cell, unpack(out))
  if not cur[1] then redis.call('HSET', KEYS[tonumber(ARGV[i + 1])], 'K' .. ARGV[i + 3], ARGV[i + 4]) end
  i = i + 6
end
return 0
