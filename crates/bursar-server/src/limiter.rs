//! Rate limits shared by every instance, in Redis.
//!
//! The cells are the engine's own GCRA cells (`bursar_core::ratelimit`), kept in Redis as
//! one integer each: the theoretical arrival time in microseconds, on Redis's clock (so
//! instances whose clocks differ still count alike). One Lua script checks every cell a
//! call counts against and, when all of them fit, takes them all: Redis runs a script
//! atomically, so two instances can never both take the last unit. A call the engine
//! then denies (its budget, say) gives its units back with a second script, so a call
//! denied by its budget does not use up its rate, as on one instance.
//!
//! A cell's key expires when the cell is whole again, so Redis holds only the cells in
//! use.

use std::time::Duration;

use bursar_core::engine::{RateCheck, RateLeft};
use bursar_core::ratelimit::{Gcra, RateError};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

/// Checks every cell; takes them all when all fit (or, when `ARGV[1]` is `0`, takes
/// those that fit: shadow mode records a denial and goes on). `ARGV` then holds units and
/// limit per minute for each key. Returns Redis's time in microseconds, then per cell
/// `1, new_tat` when it fits, `0, allow_at` when it must wait, `-1, 0` when it never fits.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local minute = 60000000
local strict = ARGV[1] == '1'
local out = {now}
local news = {}
local denied = false
for i, key in ipairs(KEYS) do
  local n = tonumber(ARGV[2 * i])
  local per_minute = tonumber(ARGV[2 * i + 1])
  if n > per_minute then
    out[2 * i], out[2 * i + 1] = -1, 0
    denied = true
  else
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < now then tat = now end
    local new_tat = tat + math.floor(n * minute / per_minute)
    local allow_at = new_tat - minute
    if now < allow_at then
      out[2 * i], out[2 * i + 1] = 0, allow_at
      denied = true
    else
      out[2 * i], out[2 * i + 1] = 1, new_tat
      news[i] = new_tat
    end
  end
end
if not (strict and denied) then
  for i, key in ipairs(KEYS) do
    if news[i] then
      redis.call('SET', key, news[i], 'PX', math.floor((news[i] - now) / 1000) + 1000)
    end
  end
end
return out
";

/// Gives back what [`TAKE`] took for a call that was then denied: `ARGV` holds units and
/// limit per minute for each key.
const GIVE_BACK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local minute = 60000000
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key))
  if tat then
    local n = tonumber(ARGV[2 * i - 1])
    local per_minute = tonumber(ARGV[2 * i])
    local back = tat - math.floor(n * minute / per_minute)
    if back <= now then
      redis.call('DEL', key)
    else
      redis.call('SET', key, back, 'PX', math.floor((back - now) / 1000) + 1000)
    end
  end
end
return 1
";

/// What Redis keys start with unless `server.redis_prefix` says otherwise.
pub const DEFAULT_PREFIX: &str = "bursar";

/// How long a call waits for Redis before it counts as unreachable.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Redis could not be reached, or answered nonsense.
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct LimiterDown(String);

/// Redis: the distributed rate limiter, and the shared half of the response cache.
pub struct Limiter {
    conn: ConnectionManager,
    /// What every key starts with: `<prefix>:rl:` (rate cells), `<prefix>:cache:`
    /// (answers).
    prefix: String,
    take: Script,
    give_back: Script,
}

/// What a call took from the limiter; given back if the call is denied after.
pub struct Taken {
    pub outcomes: Vec<Result<RateLeft, RateError>>,
    cells: Vec<(String, u64, u32)>,
}

impl Limiter {
    /// A limiter on `url`. It connects lazily, so an instance starts while Redis is down
    /// (and fails closed, or open for the tenants so configured, until it returns).
    pub fn new(url: &str, prefix: &str) -> Result<Limiter, LimiterDown> {
        let client = redis::Client::open(url).map_err(|e| LimiterDown(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| LimiterDown(e.to_string()))?;
        Ok(Limiter {
            conn,
            prefix: prefix.to_string(),
            take: Script::new(TAKE),
            give_back: Script::new(GIVE_BACK),
        })
    }

    fn note<T>(&self, r: redis::RedisResult<T>) -> Result<T, LimiterDown> {
        r.map_err(|e| {
            metrics::counter!("bursar_redis_errors_total").increment(1);
            LimiterDown(e.to_string())
        })
    }

    /// Asks Redis whether it is there (for `/readyz`).
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
        self.note(r).is_ok()
    }

    /// Checks and takes a call's cells: all of them or none when `all_or_nothing`,
    /// otherwise those that fit.
    pub async fn take<'p>(
        &self,
        checks: impl Iterator<Item = RateCheck<'p>>,
        all_or_nothing: bool,
    ) -> Result<Taken, LimiterDown> {
        let cells: Vec<(String, u64, u32)> = checks
            .map(|c| {
                (
                    format!("{}:rl:{}", self.prefix, c.cell),
                    c.units,
                    c.per_minute,
                )
            })
            .collect();
        let mut inv = self.take.prepare_invoke();
        inv.arg(if all_or_nothing { "1" } else { "0" });
        for (key, units, per_minute) in &cells {
            inv.key(key).arg(units).arg(per_minute);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = self.note(inv.invoke_async(&mut conn).await)?;
        let (now, rest) = reply
            .split_first()
            .filter(|(_, rest)| rest.len() == 2 * cells.len())
            .ok_or_else(|| LimiterDown(format!("the take script answered {reply:?}")))?;
        let outcomes = rest
            .chunks_exact(2)
            .zip(&cells)
            .map(|(r, (_, _, per_minute))| match r[0] {
                1 => {
                    let (remaining, reset) = Gcra::at(r[1]).standing_us(*now, *per_minute);
                    Ok(RateLeft { remaining, reset })
                }
                0 => Err(RateError::Wait(Duration::from_micros(
                    u64::try_from(r[1] - now).unwrap_or(0),
                ))),
                _ => Err(RateError::NeverFits),
            })
            .collect();
        Ok(Taken { outcomes, cells })
    }

    /// The response cache's shared half: the answer some instance keeps under `key`.
    pub async fn cache_get(&self, key: &[u8; 32]) -> Result<Option<Vec<u8>>, LimiterDown> {
        let mut conn = self.conn.clone();
        let r = redis::cmd("GET")
            .arg(self.cache_key(key))
            .query_async(&mut conn)
            .await;
        self.note(r)
    }

    /// Keeps an answer under `key` for every instance, for `ttl`.
    pub async fn cache_put(
        &self,
        key: &[u8; 32],
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), LimiterDown> {
        let mut conn = self.conn.clone();
        let r = redis::cmd("SET")
            .arg(self.cache_key(key))
            .arg(value)
            .arg("PX")
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .query_async(&mut conn)
            .await;
        self.note(r)
    }

    fn cache_key(&self, key: &[u8; 32]) -> String {
        format!("{}:cache:{}", self.prefix, hex::encode(key))
    }

    /// Gives back the cells `taken` holds. Best effort: a unit not given back comes back
    /// by itself within the limit's minute.
    pub async fn give_back(&self, taken: &Taken, all_or_nothing: bool) {
        if all_or_nothing && taken.outcomes.iter().any(Result::is_err) {
            return; // nothing was taken
        }
        let mut inv = self.give_back.prepare_invoke();
        let mut any = false;
        for ((key, units, per_minute), o) in taken.cells.iter().zip(&taken.outcomes) {
            if o.is_ok() {
                inv.key(key).arg(units).arg(per_minute);
                any = true;
            }
        }
        if !any {
            return;
        }
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<i64> = inv.invoke_async(&mut conn).await;
        if let Err(e) = self.note(r) {
            tracing::warn!(error = %e, "rate-limit units not given back");
        }
    }
}
