-- Adds a delta of job outcomes to the hourly rollups and the running totals (worker.rollups).
-- KEYS: every hash the blocks below name, by index. ARGV[1]: tenants an hour keeps rows
-- for. Then one block per cell:
--   'h', hour index key, cell key, other cell key, expire-at (unix s), tenant,
--        cell id, dims, other id, other dims, n, n x (metric, amount)
--   't', totals index key, cell key, cell id, dims, n, n x (metric, amount)
-- Every cell has the metric 'n' (outcomes), so a cell without it is new. Amounts stay below
-- 2^53 (Lua numbers are doubles) and are written back as integers.
local cap = tonumber(ARGV[1])

-- Add the block's amounts (ARGV[m], ARGV[m + 1], ...) to a cell hash. The first metric is
-- 'n': returns true when the cell had none (it is new).
local function bump(key, m, n, new)
  local fields = {}
  for k = 1, n do fields[k] = ARGV[m + 2 * k - 2] end
  local cur = {}
  if not new then cur = redis.call('HMGET', key, unpack(fields)) end
  local out = {}
  for k = 1, n do
    out[2 * k - 1] = fields[k]
    out[2 * k] = string.format('%d', (tonumber(cur[k]) or 0) + tonumber(ARGV[m + 2 * k - 1]))
  end
  redis.call('HSET', key, unpack(out))
  return not cur[1]
end

local i = 2
while i <= #ARGV do
  if ARGV[i] == 'h' then
    local index, cell, expire_at = KEYS[tonumber(ARGV[i + 1])], KEYS[tonumber(ARGV[i + 2])], ARGV[i + 4]
    local tenant, cid, dims = ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
    local n, m = tonumber(ARGV[i + 10]), i + 11
    local got = redis.call('HMGET', index, 'K' .. cid, 'T' .. tenant, '#T')
    local out = {}
    if tenant ~= '' and not got[2] then
      local count = tonumber(got[3]) or 0
      if count < cap then
        out = {'T' .. tenant, '1', '#T', tostring(count + 1)}
      else -- the hour's tenant rows are taken: this outcome counts under "other"
        cell, cid, dims = KEYS[tonumber(ARGV[i + 3])], ARGV[i + 8], ARGV[i + 9]
        got[1] = redis.call('HGET', index, 'K' .. cid)
      end
    end
    local new = not got[1]
    if new then
      out[#out + 1] = 'K' .. cid
      out[#out + 1] = dims
    end
    if #out > 0 then redis.call('HSET', index, unpack(out)) end
    bump(cell, m, n, new)
    if new then
      redis.call('EXPIREAT', cell, expire_at)
      redis.call('EXPIREAT', index, expire_at)
    end
    i = m + 2 * n
  elseif ARGV[i] == 't' then
    local index, cell, cid, dims = KEYS[tonumber(ARGV[i + 1])], KEYS[tonumber(ARGV[i + 2])], ARGV[i + 3], ARGV[i + 4]
    local n, m = tonumber(ARGV[i + 5]), i + 6
    if bump(cell, m, n, false) then redis.call('HSET', index, 'K' .. cid, dims) end
    i = m + 2 * n
  else
    return redis.error_reply('rollup delta: unknown block ' .. tostring(ARGV[i]))
  end
end
return 0
