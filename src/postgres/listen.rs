//! Changes made by other processes, for `claim_or_wait`: a connection of its own that LISTENs on
//! the schema's channel, where every commit that ends a claim (complete, release, expire)
//! NOTIFYs the key. Each notification wakes the key's waiters in this process.
//!
//! The connection is made and listens only while this process has waiters: each waiter asks
//! for it before it waits ([`Listener::wanted`]), and it is closed once no waiter has asked for
//! [`IDLE`]. A listening connection is woken by every claim that ends in any process,
//! including this one's own completes; with no one waiting here, that was a fifth of a
//! process's CPU at one thread of claims and completes, for nothing.
//!
//! A waiter looked at its key before it asked, so a change made between that look and the
//! `LISTEN` would be lost: once listening, every waiter wakes to look once more. The same
//! holds when the connection drops and is made again. Every waiter also wakes once a [`POLL`]
//! to look again whatever the notifications said: polling is the fallback, and it makes each
//! waiter ask again, which keeps the connection open while anyone waits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

use super::pool::Pool;
use super::runtime::Runtime;
use crate::notify::KeyEvents;

/// How often waiters look again even without a notification.
const POLL: Duration = Duration::from_secs(1);

/// How long the connection stays open after a waiter last asked for it: many times
/// [`POLL`], after which every waiter has asked again.
const IDLE: Duration = Duration::from_secs(10);

/// How long to wait before connecting again after the connection failed.
const RECONNECT: Duration = Duration::from_millis(200);

/// The listening task; stopped when dropped or on [`Listener::stop`].
pub(crate) struct Listener {
    task: JoinHandle<()>,
    demand: Arc<Demand>,
}

/// The waiters' demand for notifications.
struct Demand {
    /// When a waiter last asked; `None` before the first.
    last: Mutex<Option<Instant>>,
    /// Wakes the task when a waiter asks, or keeps the ask for its next wait.
    asked: Notify,
}

impl Demand {
    /// Whether no waiter has asked for [`IDLE`].
    fn idle(&self) -> bool {
        idle_since(*self.last.lock())
    }
}

/// Whether [`IDLE`] has passed since `last`, the last ask (`None`: there was none).
fn idle_since(last: Option<Instant>) -> bool {
    last.is_none_or(|last| last.elapsed() >= IDLE)
}

impl Listener {
    /// Starts the task that listens on `channel` while waiters ask for it, waking `events`'
    /// waiters.
    pub(crate) fn start(
        runtime: &Runtime,
        pool: Arc<Pool>,
        channel: String,
        events: Arc<KeyEvents>,
    ) -> Listener {
        let demand = Arc::new(Demand {
            last: Mutex::new(None),
            asked: Notify::new(),
        });
        let task = runtime
            .handle()
            .spawn(listen(pool, channel, events, demand.clone()));
        Listener { task, demand }
    }

    /// A waiter is about to wait: listen, if not already, until no waiter has asked for
    /// [`IDLE`]. Every waiter wakes to look once more when listening begins.
    pub(crate) fn wanted(&self) {
        let mut last = self.demand.last.lock();
        let was_idle = idle_since(*last);
        *last = Some(Instant::now());
        drop(last);
        // Only an idle task needs waking. A permit left by an ask made while it listens would
        // make it connect and listen once more, for nothing, after it next goes idle.
        if was_idle {
            self.demand.asked.notify_one();
        }
    }

    pub(crate) fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Aborts a task when dropped, so the connection's driver ends with the listener.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn listen(pool: Arc<Pool>, channel: String, events: Arc<KeyEvents>, demand: Arc<Demand>) {
    loop {
        // No one waits: no connection. An ask made since the last wait is kept by `Notify`.
        if demand.idle() {
            demand.asked.notified().await;
        }
        if let Ok((client, mut connection)) = pool.dedicated().await {
            let driver = AbortOnDrop(tokio::spawn({
                let events = events.clone();
                async move {
                    while let Some(Ok(message)) =
                        std::future::poll_fn(|cx| connection.poll_message(cx)).await
                    {
                        if let AsyncMessage::Notification(note) = message {
                            match decode(note.payload()) {
                                Some(key) => events.changed(&key),
                                None => events.changed_all(),
                            }
                        }
                    }
                }
            }));
            // The channel is the schema's name with a prefix, made of lowercase letters,
            // digits and underscores only (`schema::check_schema_name`).
            if client
                .batch_execute(&format!("LISTEN {channel}"))
                .await
                .is_ok()
            {
                // Whatever was notified while not listening is lost: everyone looks again.
                events.changed_all();
                while !driver.0.is_finished() {
                    tokio::time::sleep(POLL).await;
                    events.changed_all();
                    if demand.idle() {
                        // Closing the connection ends its listening.
                        break;
                    }
                }
                if !driver.0.is_finished() {
                    continue;
                }
            }
            drop(driver);
        }
        events.changed_all();
        tokio::time::sleep(RECONNECT).await;
    }
}

/// A key as a notification's payload (text): hexadecimal.
pub(crate) fn encode(key: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(key.len() * 2);
    for byte in key {
        text.push(char::from(HEX[usize::from(byte >> 4)]));
        text.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    text
}

/// The key in a payload [`encode`] made; `None` for any other text.
fn decode(payload: &str) -> Option<Vec<u8>> {
    let digits = payload.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |digit: u8| char::from(digit).to_digit(16);
    digits
        .chunks_exact(2)
        .map(|pair| Some((nibble(pair[0])? * 16 + nibble(pair[1])?) as u8))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{Demand, IDLE, decode, encode};
    use parking_lot::Mutex;
    use std::time::Instant;
    use tokio::sync::Notify;

    #[test]
    fn the_demand_lasts_for_idle_after_the_last_ask() {
        let at = |last: Option<Instant>| Demand {
            last: Mutex::new(last),
            asked: Notify::new(),
        };
        assert!(at(None).idle(), "no waiter ever asked");
        assert!(!at(Some(Instant::now())).idle());
        let long_ago = Instant::now()
            .checked_sub(IDLE)
            .expect("the clock is past IDLE");
        assert!(at(Some(long_ago)).idle());
    }

    #[test]
    fn keys_survive_the_payload() {
        for key in [&b""[..], b"k", b"\x00\xffabc", &[7u8; 300]] {
            assert_eq!(decode(&encode(key)).as_deref(), Some(key));
        }
        assert_eq!(decode("abc"), None);
        assert_eq!(decode("zz"), None);
    }
}
