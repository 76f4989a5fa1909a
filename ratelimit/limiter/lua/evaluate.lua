-- Decide and charge every counter of one rate limit request, atomically.
--
-- KEYS[i]  counter i: a string (layout below); all keys share one hash slot.
--          A key may appear more than once (a request may name one counter twice).
-- ARGV[1]  five numbers per counter, in KEYS order, each a little-endian IEEE double (so
--          40 bytes a counter; Lua reads them with one struct.unpack, text with a strtod each):
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
--
-- Written for Redis's Lua 5.1, where the script's own work was half of what a decision costs
-- Redis (callgrind, README "The state tier"): no local functions (each would be a new closure
-- on every call), one table per distinct counter with numbered fields, the reply filled in
-- place, numbers read from strings by arithmetic (tonumber() parses a string twice), and the
-- arguments packed in one string.

local time = redis.call('TIME')
local now_ms = time[1] * 1000 + math.floor(time[2] / 1000)
local count = #KEYS
local MAX_SLOT = 4294967295
local HEADER = 16

-- The fields of a counter's state, one table per distinct key, however often the request
-- names it. Slot k (1 = newest) of `raw` holds bucket NEWEST - AGE - (k - 1); KEPT of its
-- STORED slots are still in the window, and SUM is their hits.
local KEY, BUCKET_MS, SPAN, PLANNED, SUM, KEPT, STORED, AGE, NEWEST, RAW = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10

-- Every counter in one read (a key named twice is read twice; the first read is used). A
-- value that is not a counter of this layout (MGET gives other types as nil) counts as an
-- empty counter, and a charge replaces it.
local values = redis.call('MGET', unpack(KEYS))
local reply = {1, now_ms, 0, 0, 0} -- admitted, now, then over, used, reset per counter
local states = {} -- in the order of their first mention
local state_of = count > 1 and {} or nil -- key -> state, for a key named again
local admitted = true
local quota_counters = 0
local quota_over = 0

for i = 1, count do
  local limit, bucket_ms, span, hits, role = struct.unpack('<ddddd', ARGV[1], i * 40 - 39)
  local key = KEYS[i]
  local state = state_of and state_of[key]
  if not state then
    local current = math.floor(now_ms / bucket_ms)
    state = {key, bucket_ms, span, 0, 0, 0, 0, 0, current, ''}
    local raw = values[i]
    if raw and #raw >= HEADER + 4 and (#raw - HEADER) % 4 == 0 then
      local newest, sum = struct.unpack('<dd', raw)
      local stored = (#raw - HEADER) / 4
      -- Buckets newer than now (Redis's clock stepped back) still count: keep them all.
      local age = math.max(current - newest, 0)
      local kept = math.min(stored, span - age)
      if kept > 0 then
        for k = kept + 1, stored do
          sum = sum - struct.unpack('<I4', raw, HEADER + 4 * k - 3) -- left the window
        end
        state[SUM], state[KEPT], state[STORED], state[AGE], state[RAW] = sum, kept, stored, age, raw
        state[NEWEST] = math.max(current, newest)
      end
    end
    states[#states + 1] = state
    if state_of then
      state_of[key] = state
    end
  end
  -- Hits that earlier mentions of this key in the request put on it must fit together.
  local need = state[PLANNED] + hits
  state[PLANNED] = need
  local sum = state[SUM]
  local over = sum + need > limit

  -- The wait a status promises, from the buckets as they were before this request, measured
  -- from now_ms exactly (see window.reset_ms): until `need` hits fit, as buckets leave oldest
  -- first. Within the limit that is the oldest counted hit (with none, a hit made now), since
  -- everything fits already; over it, the first bucket whose leaving makes room. Bucket b
  -- leaves at (b + span) * bucket_ms; more hits than the limit never fit: a clear window.
  bucket_ms, span = state[BUCKET_MS], state[SPAN] -- a key named again: its first mention's window
  local newest = state[NEWEST]
  local reset = (newest + span) * bucket_ms - now_ms
  if sum ~= 0 then
    local top = newest - state[AGE]
    local running = sum
    local raw = state[RAW]
    for k = state[KEPT], 1, -1 do
      local slot_hits = struct.unpack('<I4', raw, HEADER + 4 * k - 3)
      if slot_hits > 0 then
        running = running - slot_hits
        if running + need <= limit then
          reset = (top - k + 1 + span) * bucket_ms - now_ms
          break
        end
      end
    end
  end

  local at = i * 3
  reply[at] = over and 1 or 0
  reply[at + 1] = sum + need -- used, this request's hits included; a rejection takes them out below
  reply[at + 2] = reset
  if over and role == 1 then
    admitted = false
  elseif role == 2 then
    quota_counters = quota_counters + 1
    if over then
      quota_over = quota_over + 1
    end
  end
end
if quota_counters > 0 and quota_over == quota_counters then
  admitted = false
end

if not admitted then
  reply[1] = 0
  for i = 1, count do
    reply[i * 3 + 1] = (state_of and state_of[KEYS[i]] or states[1])[SUM]
  end
  return reply
end

for n = 1, #states do
  local state = states[n]
  local planned = state[PLANNED]
  if planned > 0 then
    local key, sum, kept, age, newest, raw = state[KEY], state[SUM], state[KEPT], state[AGE], state[NEWEST], state[RAW]
    -- Charged to the newest bucket stored (the same one, or newer than now's).
    local same_bucket = kept > 0 and age == 0
    local first = same_bucket and struct.unpack('<I4', raw, HEADER + 1) or 0
    local head = math.min(first + planned, MAX_SLOT)
    local header = struct.pack('<ddI4', newest, sum + head - first, head)
    if same_bucket and kept == state[STORED] then
      -- Its expiry stands; only the first 20 bytes change. The offset is a string: Redis
      -- formats a number argument with snprintf.
      redis.call('SETRANGE', key, '0', header)
    else
      -- The newest bucket first, then the gap since the last charge as zeros, then the
      -- buckets still in the window: at most span slots.
      local rest = ''
      if same_bucket then
        rest = string.sub(raw, HEADER + 5, HEADER + 4 * kept)
      elseif kept > 0 then
        rest = string.rep('\0\0\0\0', age - 1) .. string.sub(raw, HEADER + 1, HEADER + 4 * kept)
      end
      -- Every bucket has left the window once the newest one has: expire then.
      redis.call('SET', key, header .. rest, 'PXAT', (newest + state[SPAN]) * state[BUCKET_MS])
    end
  end
end
return reply
