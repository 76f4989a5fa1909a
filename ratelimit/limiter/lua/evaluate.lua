-- Decide and charge every counter of one rate limit request, atomically.
--
-- KEYS[i]  counter i: a string (layout below); all keys share one hash slot.
--          A key may appear more than once (a request may name one counter twice).
-- ARGV     five values per counter, in KEYS order:
--            limit      requests per unit (integer, 0 <= limit < 2^32)
--            bucket_ms  bucket length in milliseconds
--            span       buckets counted, the current one included (1 = fixed window)
--            hits       hits to charge (0 = check only; the caller caps it at limit + 1)
--            role       1 enforce: over rejects the request; 0 shadow: never rejects;
--                       2 quota: rejects only when every quota counter of the request is over
-- Returns  {admitted (0/1), now_ms, then per counter: over_limit (0/1), used, reset_ms}
--          used: hits in the window, with this request's hits up to this counter when admitted.
--
-- A counter is one string, newest bucket first:
--   8 bytes   the newest bucket's index (little-endian IEEE double: exact below 2^53)
--   8 bytes   the sum of the hits stored (a double, exact), so a decision reads no bucket
--   4 bytes   hits in the newest bucket, then 4 bytes for each older bucket in turn, at most
--             `span` in all (unsigned 32-bit little-endian, saturating at 2^32 - 1)
-- A counter hit once is 20 bytes; one with hits in every bucket of its window, 16 + 4 * span.
-- Buckets that left the window are cut off the end when the counter is next charged; a
-- read leaves them out. A decision costs one MGET, then, only when hits are charged, SETRANGE of
-- the first 20 bytes (same bucket: the expiry stands) or SET ... PXAT (a new bucket). It
-- reads the oldest counted bucket (for the reset) and the ones that just left, nothing else,
-- unless it is over the limit (then the reset walks the buckets, oldest first).
--
-- Time is Redis's own (TIME), so every replica shares one clock; a counter's clock never
-- goes back (a bucket older than its newest is charged to the newest, which leaves later).
-- A request is admitted only when no enforcing counter is over and not all of its quota
-- counters are over; only then are hits added (all-or-nothing).
-- Mirrors ratelimit/limiter/window.py and memory.py, which document the arithmetic.

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local count = #KEYS
local MAX_SLOT = 4294967295
local HEADER = 16

-- One state per distinct key, however often the request names it.
local states = {}
local order = {}
local over = {}
local used = {}
local through = {}
local resets = {}
local admitted = true
local quota_counters = 0
local quota_over = 0

local function leaves_at(state, index)
  return (index + state.span) * state.bucket_ms
end

-- Hits in slot k (1 = newest) of a stored counter.
local function slot(raw, k)
  return (struct.unpack('<I4', raw, HEADER + 4 * k - 3))
end

local function load(key, raw, bucket_ms, span)
  local current = math.floor(now_ms / bucket_ms)
  local state = {key = key, bucket_ms = bucket_ms, span = span, planned = 0, sum = 0, kept = 0,
                 stored = 0, age = 0, newest = current, raw = ''}
  if raw and #raw >= HEADER + 4 and (#raw - HEADER) % 4 == 0 then
    local newest, sum = struct.unpack('<dd', raw)
    local stored = (#raw - HEADER) / 4
    -- Buckets newer than now (Redis's clock stepped back) still count: keep them all.
    local age = math.max(current - newest, 0)
    local kept = math.min(stored, span - age)
    if kept > 0 then
      for k = kept + 1, stored do
        sum = sum - slot(raw, k) -- left the window
      end
      state.newest = math.max(current, newest)
      state.kept = kept
      state.stored = stored
      state.age = age
      state.sum = sum
      state.raw = raw
    end
  end
  return state
end

-- Slot k (1 = newest) of a state holds bucket state.newest - state.age - (k - 1).
-- The wait a status promises, from the buckets as they were before this request, measured
-- from now_ms exactly (see window.reset_ms): until `need` hits fit once the buckets up to
-- this one have left. Within the limit that is the oldest counted hit (with none, a hit made
-- now), since everything fits already; over it, the first bucket whose leaving makes room.
local function reset_ms(state, limit, need)
  if state.sum == 0 then
    return leaves_at(state, state.newest) - now_ms
  end
  local top = state.newest - state.age
  local running = state.sum
  for k = state.kept, 1, -1 do
    local hits = slot(state.raw, k)
    if hits > 0 then
      running = running - hits
      if running + need <= limit then
        return leaves_at(state, top - k + 1) - now_ms
      end
    end
  end
  return leaves_at(state, state.newest) - now_ms -- a clear window: more hits than the limit never fit
end

-- Every counter in one read (a key named twice is read twice; the first read is used). A
-- value that is not a counter of this layout (MGET gives other types as nil) counts as an
-- empty counter, and a charge replaces it.
local values = redis.call('MGET', unpack(KEYS))
for i = 1, count do
  local base = (i - 1) * 5
  local limit = tonumber(ARGV[base + 1])
  local hits = tonumber(ARGV[base + 4])
  local role = tonumber(ARGV[base + 5])
  local key = KEYS[i]
  local state = states[key]
  if not state then
    state = load(key, values[i], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]))
    states[key] = state
    order[#order + 1] = state
  end
  -- Hits that earlier mentions of this key in the request put on it must fit together.
  local need = state.planned + hits
  state.planned = need
  through[i] = need
  used[i] = state.sum
  over[i] = state.sum + need > limit
  resets[i] = reset_ms(state, limit, need)
  if over[i] and role == 1 then
    admitted = false
  elseif role == 2 then
    quota_counters = quota_counters + 1
    if over[i] then
      quota_over = quota_over + 1
    end
  end
end
if quota_counters > 0 and quota_over == quota_counters then
  admitted = false
end

if admitted then
  for _, state in ipairs(order) do
    if state.planned > 0 then
      -- Charged to the newest bucket stored (the same one, or newer than now's).
      local same_bucket = state.kept > 0 and state.age == 0
      local first = same_bucket and slot(state.raw, 1) or 0
      local head = math.min(first + state.planned, MAX_SLOT)
      local header = struct.pack('<ddI4', state.newest, state.sum + head - first, head)
      if same_bucket and state.kept == state.stored then
        -- Its expiry stands; only the first 20 bytes change.
        redis.call('SETRANGE', state.key, 0, header)
      else
        -- The newest bucket first, then the gap since the last charge as zeros, then the
        -- buckets still in the window: at most span slots.
        local rest = ''
        if same_bucket then
          rest = string.sub(state.raw, HEADER + 5, HEADER + 4 * state.kept)
        elseif state.kept > 0 then
          rest = string.rep('\0\0\0\0', state.age - 1) .. string.sub(state.raw, HEADER + 1, HEADER + 4 * state.kept)
        end
        -- Every bucket has left the window once the newest one has: expire then.
        redis.call('SET', state.key, header .. rest, 'PXAT', leaves_at(state, state.newest))
      end
    end
  end
end

local reply = {admitted and 1 or 0, now_ms}
for i = 1, count do
  reply[#reply + 1] = over[i] and 1 or 0
  reply[#reply + 1] = admitted and used[i] + through[i] or used[i]
  reply[#reply + 1] = resets[i]
end
return reply
