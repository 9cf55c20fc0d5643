-- Folds outcome records into the hourly rollup cells (see worker.rollups).
-- METRICS (the metric names, in worker.rollups' order) is defined above this line.
-- KEYS[1]: the rollups' queue, KEYS[2]: the live hours (a sorted set of hour numbers),
-- KEYS[3]: the folding lease. ARGV: key prefix, tenants an hour keeps rows for, seconds the
-- hours are kept after they end, the caller's lease token, how many queue entries the records
-- add up (they leave the queue here), the lease's milliseconds, then the records.
-- A record: little-endian uint32 hour (since the epoch), the hour as YYYYMMDDHH (10 bytes),
-- uint16 length and the cell's dims (feature, model, priority, tenant, separated by \31),
-- then (uint8 metric number, double amount) pairs, 'n' (outcomes) first.
-- Nothing is applied unless the caller still holds the lease (-1): the queue entries leave
-- the queue in the script that applies what they add up, so each is counted once, also when
-- a folder paused past its lease and another took over. Records of the same cell are added
-- up first; then each cell costs one HMGET and one HSET (a new cell also looks at the hour's
-- index: is its tenant one of the hour's first `cap`?, and makes sure the hour is in the live
-- set, which worker.compaction and the readers go by). Amounts stay below 2^53 (Lua numbers
-- are doubles), which redis.call writes back as exact integers.
local prefix, cap, keep_s = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('GET', KEYS[3]) ~= ARGV[4] then return -1 end
redis.call('LTRIM', KEYS[1], tonumber(ARGV[5]), -1)
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[6]))
local cells, order, formats, live = {}, {}, {}, {}

-- Add one record to its cell's sums (a record that does not parse is left out).
local function take(rec)
  local hour, label, size = struct.unpack('<Ic10H', rec)
  local dims, blob = rec:sub(17, 16 + size), rec:sub(17 + size)
  local n = #blob / 9
  if n < 1 or n % 1 ~= 0 then return end
  formats[n] = formats[n] or '<' .. string.rep('Bd', n)
  local raw = {struct.unpack(formats[n], blob)}
  local head = label .. '\31' .. dims
  local cell = cells[head]
  if not cell then
    cell = {hour = hour, label = label, dims = dims, sums = {}, names = {}}
    cells[head] = cell
    order[#order + 1] = head
  end
  for k = 1, n do
    local name = METRICS[raw[2 * k - 1] + 1]
    if name then
      if not cell.sums[name] then cell.names[#cell.names + 1] = name end
      cell.sums[name] = (cell.sums[name] or 0) + raw[2 * k]
    end
  end
end

for k = 7, #ARGV do pcall(take, ARGV[k]) end

-- HSET a cell's sums added to the hash's current values (cur, in cell.names' order).
local function write(key, cell, cur)
  local out = {}
  for k, name in ipairs(cell.names) do
    out[2 * k - 1] = name
    out[2 * k] = (cur[k] or 0) + cell.sums[name]
  end
  redis.call('HSET', key, unpack(out))
end

local function first_n(a, b)
  if a == 'n' then return b ~= 'n' end
  if b == 'n' then return false end
  return a < b
end

-- Add one cell's sums to its hash (and the hour's index, when the cell is new).
local function apply(cell)
  table.sort(cell.names, first_n)
  local index, dims = prefix .. ':rollup:h:' .. cell.label, cell.dims
  local cid = redis.sha1hex(dims):sub(1, 16)
  local key = index .. ':' .. cid
  local cur = redis.call('HMGET', key, unpack(cell.names))
  if not cur[1] then -- a new cell of this hour: may its tenant have rows of its own?
    local expire_at, tenant, out = (cell.hour + 1) * 3600 + keep_s, dims:match('\31([^\31]*)$'), {}
    if tenant and tenant ~= '' then
      local got = redis.call('HMGET', index, 'T' .. tenant, '#T')
      if not got[1] then
        local count = tonumber(got[2]) or 0
        if count < cap then
          out = {'T' .. tenant, '1', '#T', tostring(count + 1)}
        else -- the hour's tenant rows are taken: these outcomes count under "other"
          dims = dims:sub(1, #dims - #tenant) .. '\30other'
          cid = redis.sha1hex(dims):sub(1, 16)
          key = index .. ':' .. cid
          cur = redis.call('HMGET', key, unpack(cell.names))
        end
      end
    end
    if not cur[1] then
      out[#out + 1] = 'K' .. cid
      out[#out + 1] = dims
    end
    if #out > 0 then
      redis.call('HSET', index, unpack(out))
      redis.call('EXPIREAT', index, expire_at)
    end
    if not live[cell.hour] then -- the hour has cells: it is live until compacted
      redis.call('ZADD', KEYS[2], cell.hour, cell.hour)
      live[cell.hour] = true
    end
    write(key, cell, cur)
    if not cur[1] then redis.call('EXPIREAT', key, expire_at) end
  else
    write(key, cell, cur)
  end
end

-- A cell whose hash is not ours (another program wrote the key) is left out, not the batch.
for _, head in ipairs(order) do pcall(apply, cells[head]) end
return #ARGV - 6
