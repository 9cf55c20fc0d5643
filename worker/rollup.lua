-- Adds a delta of job outcomes to the hourly rollups and the running totals (worker.rollups).
-- METRICS (the metric names, in worker.rollups' order) is defined above this line.
-- KEYS: every hash the blocks below name, by index. ARGV[1]: tenants an hour keeps rows
-- for. Then one block per cell:
--   'h', hour index key, cell key, other cell key, expire-at (unix s), tenant,
--        cell id, dims, other id, other dims, amounts
--   't', totals index key, cell key, cell id, dims, amounts
-- amounts: (metric number, amount) pairs packed as little-endian (uint8, double), 'n' (the
-- outcomes) first, which every cell has: a cell without it is new. Only a new cell of an hour
-- looks at the hour's index (is its tenant one of the hour's first `cap`?), so the usual
-- outcome costs one HMGET and one HSET. Amounts stay below 2^53 (Lua numbers are doubles),
-- which redis.call writes back as exact integers.
local cap = tonumber(ARGV[1])
local formats = {}

-- The block's metric names and amounts, and the cell's current values of them.
local function read(key, blob)
  local n = #blob / 9
  formats[n] = formats[n] or '<' .. string.rep('Bd', n)
  local raw, fields, amounts = {struct.unpack(formats[n], blob)}, {}, {}
  for k = 1, n do
    fields[k] = METRICS[raw[2 * k - 1] + 1]
    amounts[k] = raw[2 * k]
  end
  return fields, amounts, redis.call('HMGET', key, unpack(fields))
end

-- HSET each field at its current value plus the block's amount.
local function write(key, fields, amounts, cur)
  local out = {}
  for k = 1, #fields do
    out[2 * k - 1] = fields[k]
    out[2 * k] = (cur[k] or 0) + amounts[k]
  end
  redis.call('HSET', key, unpack(out))
end

local i = 2
while i <= #ARGV do
  if ARGV[i] == 'h' then
    local cell, blob = KEYS[tonumber(ARGV[i + 2])], ARGV[i + 10]
    local fields, amounts, cur = read(cell, blob)
    if not cur[1] then
      local index, tenant, cid, dims = KEYS[tonumber(ARGV[i + 1])], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
      local out = {}
      if tenant ~= '' then
        local got = redis.call('HMGET', index, 'T' .. tenant, '#T')
        if not got[1] then
          local count = tonumber(got[2]) or 0
          if count < cap then
            out = {'T' .. tenant, '1', '#T', tostring(count + 1)}
          else -- the hour's tenant rows are taken: this outcome counts under "other"
            cell, cid, dims = KEYS[tonumber(ARGV[i + 3])], ARGV[i + 8], ARGV[i + 9]
            fields, amounts, cur = read(cell, blob)
          end
        end
      end
      if not cur[1] then
        out[#out + 1] = 'K' .. cid
        out[#out + 1] = dims
      end
      if #out > 0 then
        redis.call('HSET', index, unpack(out))
        redis.call('EXPIREAT', index, ARGV[i + 4])
      end
      write(cell, fields, amounts, cur)
      if not cur[1] then redis.call('EXPIREAT', cell, ARGV[i + 4]) end
    else
      write(cell, fields, amounts, cur)
    end
    i = i + 11
  elseif ARGV[i] == 't' then
    local cell = KEYS[tonumber(ARGV[i + 2])]
    local fields, amounts, cur = read(cell, ARGV[i + 5])
    write(cell, fields, amounts, cur)
    if not cur[1] then redis.call('HSET', KEYS[tonumber(ARGV[i + 1])], 'K' .. ARGV[i + 3], ARGV[i + 4]) end
    i = i + 6
  else
    return redis.error_reply('rollup delta: unknown block ' .. tostring(ARGV[i]))
  end
end
return 0
