-- Decide and charge every counter of one rate limit request, atomically.
--
-- KEYS[i]  counter i: a hash {bucket index -> hits}; all keys share one hash slot.
--          A key may appear more than once (a request may name one counter twice).
-- ARGV     five values per counter, in KEYS order:
--            limit      requests per unit (integer >= 0)
--            bucket_ms  bucket length in milliseconds
--            span       buckets counted, the current one included (1 = fixed window)
--            hits       hits to charge (0 = check only; the caller caps it at limit + 1)
--            role       1 enforce: over rejects the request; 0 shadow: never rejects;
--                       2 quota: rejects only when every quota counter of the request is over
-- Returns  {admitted (0/1), now_ms, then per counter: over_limit (0/1), used, reset_ms}
--          used: hits in the window, with this request's hits up to this counter when admitted.
--
-- Time is Redis's own (TIME), so every replica shares one clock. A request is admitted
-- only when no enforcing counter is over and not all of its quota counters are over;
-- only then are hits added (all-or-nothing).
-- Mirrors ratelimit/limiter/window.py and memory.py, which document the arithmetic.

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local count = #KEYS

local specs = {}
local used = {}
local through = {}
local over = {}
local resets = {}
local planned = {}
local admitted = true
local quota_counters = 0
local quota_over = 0

local function leaves_at(spec, index)
  return (index + spec.span) * spec.bucket_ms
end

-- The wait a status promises, from the buckets as they were before this request.
-- Measured from now_ms exactly (see window.reset_ms).
local function reset_ms(spec, live, total, need, is_over)
  local reference = now_ms
  local ordered = {}
  for index, hits in pairs(live) do
    if hits > 0 then
      ordered[#ordered + 1] = index
    end
  end
  if #ordered == 0 then
    return leaves_at(spec, spec.current) - reference
  end
  table.sort(ordered)
  if not is_over then
    return leaves_at(spec, ordered[1]) - reference
  end
  local running = total
  for _, index in ipairs(ordered) do
    running = running - live[index]
    if running + need <= spec.limit then
      return leaves_at(spec, index) - reference
    end
  end
  return leaves_at(spec, math.max(ordered[#ordered], spec.current)) - reference
end

for i = 1, count do
  local base = (i - 1) * 5
  local spec = {
    limit = tonumber(ARGV[base + 1]),
    bucket_ms = tonumber(ARGV[base + 2]),
    span = tonumber(ARGV[base + 3]),
    hits = tonumber(ARGV[base + 4]),
    role = tonumber(ARGV[base + 5]),
  }
  spec.current = math.floor(now_ms / spec.bucket_ms)
  specs[i] = spec

  local first = spec.current - spec.span + 1
  local flat = redis.call('HGETALL', KEYS[i])
  local live = {}
  local stale = {}
  local sum = 0
  for j = 1, #flat, 2 do
    local index = tonumber(flat[j])
    if index < first then
      stale[#stale + 1] = flat[j]
    else
      local hits = tonumber(flat[j + 1])
      live[index] = hits
      sum = sum + hits
    end
  end
  if #stale > 0 then
    redis.call('HDEL', KEYS[i], unpack(stale))
  end
  local earlier = planned[KEYS[i]] or 0
  planned[KEYS[i]] = earlier + spec.hits
  through[i] = earlier + spec.hits
  used[i] = sum
  over[i] = sum + through[i] > spec.limit
  resets[i] = reset_ms(spec, live, sum, through[i], over[i])
  if over[i] and spec.role == 1 then
    admitted = false
  elseif spec.role == 2 then
    quota_counters = quota_counters + 1
    if over[i] then
      quota_over = quota_over + 1
    end
  end
end
if quota_counters > 0 and quota_over == quota_counters then
  admitted = false
end

local reply = {admitted and 1 or 0, now_ms}
for i = 1, count do
  local spec = specs[i]
  if admitted then
    used[i] = used[i] + through[i]
    if spec.hits > 0 then
      redis.call('HINCRBY', KEYS[i], spec.current, spec.hits)
      -- Every bucket has left the window once the current one has: expire then.
      redis.call('PEXPIREAT', KEYS[i], leaves_at(spec, spec.current))
    end
  end
  reply[#reply + 1] = over[i] and 1 or 0
  reply[#reply + 1] = used[i]
  reply[#reply + 1] = resets[i]
end
return reply
