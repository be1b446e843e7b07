//! Changes made by other processes, for `claim_or_wait`: a connection of its own that LISTENs on
//! the schema's channel, where every commit that ends a claim (complete, release, expire)
//! NOTIFYs the key. Each notification wakes the key's waiters in this process.
//!
//! Should the connection drop, it is made again, and every waiter wakes to look once more,
//! since notifications sent meanwhile are lost. Every waiter also wakes once a
//! [`POLL`] to look again whatever the notifications said: polling is the fallback.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

use super::pool::Pool;
use super::runtime::Runtime;
use crate::notify::KeyEvents;

/// How often waiters look again even without a notification.
const POLL: Duration = Duration::from_secs(1);

/// How long to wait before connecting again after the connection failed.
const RECONNECT: Duration = Duration::from_millis(200);

/// The listening task; stopped when dropped or on [`Listener::stop`].
pub(crate) struct Listener {
    task: JoinHandle<()>,
}

impl Listener {
    /// Starts listening on `channel`, waking `events`' waiters.
    pub(crate) fn start(
        runtime: &Runtime,
        pool: Arc<Pool>,
        channel: String,
        events: Arc<KeyEvents>,
    ) -> Listener {
        let task = runtime.handle().spawn(listen(pool, channel, events));
        Listener { task }
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

async fn listen(pool: Arc<Pool>, channel: String, events: Arc<KeyEvents>) {
    loop {
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
    use super::{decode, encode};

    #[test]
    fn keys_survive_the_payload() {
        for key in [&b""[..], b"k", b"\x00\xffabc", &[7u8; 300]] {
            assert_eq!(decode(&encode(key)).as_deref(), Some(key));
        }
        assert_eq!(decode("abc"), None);
        assert_eq!(decode("zz"), None);
    }
}
