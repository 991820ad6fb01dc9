//! The clock. Workers have no system clock a library may read (`std::time` panics on
//! wasm32), so time comes from the runtime's `Date.now()` here and is passed into every
//! pure decision (`SessionRecord::is_honoured`, `assertion::sign`) as a number.
//!
//! Inside a request, `Date.now()` advances only with I/O (a Spectre mitigation); that is
//! precise enough for session expiry and 60-second assertions.

/// Milliseconds since the Unix epoch.
#[cfg(target_arch = "wasm32")]
pub fn now_millis() -> u64 {
    // The static `Date.now()`: one call, no `Date` object (workers-rs' `Date::now` makes
    // one and reads it).
    worker::js_sys::Date::now() as u64
}

/// Seconds since the Unix epoch.
#[cfg(target_arch = "wasm32")]
pub fn now_unix() -> i64 {
    i64::try_from(now_millis() / 1000).unwrap_or(i64::MAX)
}
