//! What the owner of a claim does with its ticket: complete, release, extend and checkpoint.
//! Each acts only while the ticket's fencing token is the record's (SEMANTICS.md §6).

use std::time::Duration;

use super::Store;
use crate::claim::Ticket;
use crate::error::{Error, Result};
use crate::limits;
use crate::rules::ops::{Checkpoint, Complete, Extend, Release};

impl Store {
    fn check_ticket(&self, ticket: &Ticket) -> Result<()> {
        if ticket.store_id != self.engine().store_id() {
            return Err(Error::ForeignTicket {
                key: ticket.key.clone(),
            });
        }
        Ok(())
    }

    /// Completes the ticket's claim with `response`, kept for the store's TTL and replayed to
    /// every later claim of the key. A ticket whose lease ran out may still complete as long as
    /// nobody took over.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] if the ticket no longer owns the key (taken over, released,
    /// completed, expired or swept); nothing changes. [`Error::ResponseTooLarge`],
    /// [`Error::ForeignTicket`]; [`Error::Storage`] if the commit failed (not completed).
    pub fn complete(&self, ticket: &Ticket, response: impl AsRef<[u8]>) -> Result<()> {
        self.complete_inner(ticket, response.as_ref(), self.engine().config().ttl)
    }

    /// Like [`Store::complete`], keeping the outcome for `ttl` instead of the store's TTL.
    ///
    /// # Errors
    /// As for [`Store::complete`], and [`Error::InvalidDuration`] for a zero or huge `ttl`.
    pub fn complete_with_ttl(
        &self,
        ticket: &Ticket,
        response: impl AsRef<[u8]>,
        ttl: Duration,
    ) -> Result<()> {
        let ttl = limits::duration_millis("ttl", ttl)?;
        self.complete_inner(ticket, response.as_ref(), ttl)
    }

    fn complete_inner(&self, ticket: &Ticket, response: &[u8], ttl: u64) -> Result<()> {
        self.observed("complete", Some(ticket.key.as_bytes()), || {
            self.check_ticket(ticket)?;
            limits::check_response(response, self.engine().config().max_response_bytes)?;
            let op = Complete {
                fencing_token: ticket.fencing_token,
                response: response.to_vec(),
                ttl,
            };
            self.engine().one(ticket.key.clone(), op)
        })
    }

    /// Gives the key up after a failure worth retrying: the in-progress record is removed so
    /// the next claim acquires at once.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] if the ticket no longer owns the key; [`Error::ForeignTicket`];
    /// [`Error::Storage`].
    pub fn release(&self, ticket: &Ticket) -> Result<()> {
        self.observed("release", Some(ticket.key.as_bytes()), || {
            self.check_ticket(ticket)?;
            let op = Release {
                fencing_token: ticket.fencing_token,
            };
            self.engine().one(ticket.key.clone(), op)
        })
    }

    /// Heartbeat for long work: moves the lease deadline to `now + lease` and updates the
    /// ticket's [`lease_until`](Ticket::lease_until).
    ///
    /// # Errors
    /// [`Error::LeaseLost`], [`Error::ForeignTicket`], [`Error::InvalidDuration`],
    /// [`Error::Storage`].
    pub fn extend(&self, ticket: &mut Ticket, lease: Duration) -> Result<()> {
        let key = ticket.key.clone();
        ticket.lease_until = self.observed("extend", Some(key.as_bytes()), || {
            self.check_ticket(ticket)?;
            let op = Extend {
                fencing_token: ticket.fencing_token,
                lease: limits::duration_millis("lease", lease)?,
            };
            self.engine().one(key.clone(), op)
        })?;
        Ok(())
    }

    /// Records, atomically and durably, that the owner finished `step`, with a small `state`
    /// blob to resume from. A takeover's ticket carries the last checkpoint
    /// ([`Ticket::checkpoint`]), so a new owner resumes after the last finished step instead of
    /// starting over; [`Store::get`] shows it too; `complete` drops it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dedupe_store::{Claim, ManualClock, Store};
    ///
    /// let clock = ManualClock::new(0);
    /// let store = Store::builder().clock(clock.clone()).lease(Duration::from_secs(5)).in_memory()?;
    /// let Claim::Acquired(first) = store.claim("checkout-7")? else { unreachable!() };
    /// store.checkpoint(&first, "order-created", b"order_id=991")?;
    /// // The first owner dies here; its lease runs out.
    /// clock.advance(Duration::from_secs(6));
    /// let Claim::Acquired(second) = store.claim("checkout-7")? else { unreachable!() };
    /// let resume = second.checkpoint().expect("the first owner's checkpoint");
    /// assert_eq!(resume.step, "order-created");
    /// assert_eq!(resume.state, b"order_id=991");
    /// # Ok::<(), dedupe_store::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::LeaseLost`] if the ticket no longer owns the key; [`Error::CheckpointTooLarge`];
    /// [`Error::ForeignTicket`]; [`Error::Storage`] if the commit failed (not recorded).
    pub fn checkpoint(&self, ticket: &Ticket, step: &str, state: impl AsRef<[u8]>) -> Result<()> {
        self.checkpoint_inner(ticket, step, state.as_ref(), None)
            .map(|_| ())
    }

    /// [`Store::checkpoint`] that also extends the lease to `now + lease` in the same write,
    /// updating the ticket's [`lease_until`](Ticket::lease_until).
    ///
    /// # Errors
    /// As for [`Store::checkpoint`], and [`Error::InvalidDuration`].
    pub fn checkpoint_and_extend(
        &self,
        ticket: &mut Ticket,
        step: &str,
        state: impl AsRef<[u8]>,
        lease: Duration,
    ) -> Result<()> {
        let lease = limits::duration_millis("lease", lease)?;
        ticket.lease_until = self.checkpoint_inner(ticket, step, state.as_ref(), Some(lease))?;
        Ok(())
    }

    fn checkpoint_inner(
        &self,
        ticket: &Ticket,
        step: &str,
        state: &[u8],
        lease: Option<u64>,
    ) -> Result<u64> {
        self.observed("checkpoint", Some(ticket.key.as_bytes()), || {
            self.check_ticket(ticket)?;
            limits::check_checkpoint(step, state)?;
            let op = Checkpoint {
                fencing_token: ticket.fencing_token,
                step: step.to_string(),
                state: state.to_vec(),
                lease,
            };
            self.engine().one(ticket.key.clone(), op)
        })
    }
}
