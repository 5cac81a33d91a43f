//! The clients' keep-alive (MQTT 3.1.1 and 5 §3.1.2.10), swept: one task per listener counts
//! ticks of [`TICK`] and, at each, closes the connections silent for longer than one and a
//! half times their keep-alive (MQTT 5: DISCONNECT 0x8D); the same task tells every
//! connection to close at shutdown.
//!
//! Why a sweep and not a timer per connection: a tokio `Sleep` is 112 bytes of every
//! connection's task (idle connection memory, issue 23), and moving it per packet batch
//! locks the timer wheel. Here a connection keeps two counters in its registry entry
//! ([`meshgate_core::connections::Connection::touch`]) and, per batch with a packet, loads
//! one shared word. The price: a silent client is closed up to one tick after its 1.5 × keep-
//! alive (never before), and each tick walks the connected clients under their lock (a load
//! of two counters each, twice a second; estimated at about a millisecond for 20,000 clients,
//! not measured), as Mosquitto checks its clients' keep-alive from its main loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use meshgate_core::connections::CloseReason;

use crate::Shared;

/// How often the sweep runs, and the keep-alive clock's unit.
pub(crate) const TICK: Duration = Duration::from_millis(500);

/// Ticks of [`TICK`] in one and a half times a keep-alive of `seconds` (0: none).
pub(crate) fn limit(seconds: u16) -> u32 {
    // 1.5 s / 0.5 s: three ticks per second of keep-alive.
    u32::from(seconds) * 3
}

/// The listener's keep-alive clock: ticks since the sweep started.
#[derive(Debug, Default)]
pub(crate) struct Clock(AtomicU32);

impl Clock {
    pub(crate) fn now(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    fn advance(&self) -> u32 {
        self.0.fetch_add(1, Ordering::Relaxed).wrapping_add(1)
    }
}

/// Sweeps `shared`'s clients every [`TICK`] until shutdown, then tells them all to close.
pub(crate) async fn sweep(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick of an interval is at once.
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = shared.ctx.shutdown.cancelled() => break,
            _ = ticks.tick() => {
                let now = shared.keep_alive.advance();
                shared.close_silent(now);
            }
        }
    }
    shared.close_all(CloseReason::Shutdown);
}
