//! One step of a scenario: the call on the store, the same on the model, and the check that
//! they answered alike.

use std::time::Duration;

use super::Runner;
use crate::testing::disk::Fault;
use crate::testing::model::{Model, Refusal};
use crate::testing::step::{
    LEASE, Step, TTL, fate_of, fingerprint_of, key_of, lease_of, millis, response_of, ttl_of,
};
use crate::{ClaimOptions, Error};

impl Runner {
    pub(super) fn step(&mut self, step: &Step) -> Result<(), String> {
        let now = self.clock.now();
        let mut next = self.model.clone();
        match *step {
            Step::Claim {
                key,
                fingerprint,
                lease,
                ttl,
            } => {
                let key = key_of(key);
                let fingerprint = fingerprint_of(fingerprint);
                let (lease, ttl) = (lease_of(lease), ttl_of(ttl));
                let mut options = ClaimOptions::new();
                if let Some(fp) = &fingerprint {
                    options = options.fingerprint(fp);
                }
                if let Some(lease) = lease {
                    options = options.lease(lease);
                }
                if let Some(ttl) = ttl {
                    options = options.ttl(ttl);
                }
                let expected = next.claim(
                    &key,
                    fingerprint.as_deref(),
                    millis(lease.unwrap_or(LEASE)),
                    millis(ttl.unwrap_or(TTL)),
                    now,
                    self.store_id()?,
                );
                match self.store()?.claim_with(&key, &options) {
                    Ok(claim) if claim == expected => {
                        if let Some(ticket) = claim.ticket() {
                            self.remember(ticket);
                        }
                        self.accept(next);
                        Ok(())
                    }
                    Ok(claim) => Err(format!("claim answered {claim:?}, expected {expected:?}")),
                    Err(err) => self.failed(&err, next, &[key]),
                }
            }
            Step::Complete {
                ticket,
                response,
                ttl,
            } => {
                let Some(ticket) = self.ticket(ticket) else {
                    return Ok(());
                };
                let key = ticket.key().as_bytes().to_vec();
                let response = response_of(response);
                let ttl = ttl_of(ttl);
                let expected = next.complete(
                    &key,
                    ticket.fencing_token(),
                    &response,
                    millis(ttl.unwrap_or(TTL)),
                    now,
                );
                let store = self.store()?;
                let result = match ttl {
                    Some(ttl) => store.complete_with_ttl(&ticket, &response, ttl),
                    None => store.complete(&ticket, &response),
                };
                self.owner_call(result, expected, next, key)
            }
            Step::Release { ticket } => {
                let Some(ticket) = self.ticket(ticket) else {
                    return Ok(());
                };
                let key = ticket.key().as_bytes().to_vec();
                let expected = next.release(&key, ticket.fencing_token(), now);
                let result = self.store()?.release(&ticket);
                self.owner_call(result, expected, next, key)
            }
            Step::Extend { ticket, lease } => {
                let Some(mut ticket) = self.ticket(ticket) else {
                    return Ok(());
                };
                let key = ticket.key().as_bytes().to_vec();
                let lease = lease_of(lease.max(1)).unwrap_or(LEASE);
                let expected = next.extend(&key, ticket.fencing_token(), millis(lease), now);
                let result = self.store()?.extend(&mut ticket, lease);
                if let (Ok(()), Ok(lease_until)) = (&result, &expected)
                    && ticket.lease_until() != *lease_until
                {
                    return Err(format!(
                        "extend set lease_until {}, expected {lease_until}",
                        ticket.lease_until()
                    ));
                }
                if result.is_ok() {
                    let fencing_token = ticket.fencing_token();
                    if let Some(held) = self
                        .tickets
                        .iter_mut()
                        .find(|held| held.fencing_token() == fencing_token)
                    {
                        *held = ticket;
                    }
                }
                self.owner_call(result, expected.map(|_| ()), next, key)
            }
            Step::Expire { key } => {
                let key = key_of(key);
                let expected = next.expire(&key, now);
                match self.store()?.expire(&key) {
                    Ok(was_live) if was_live == expected => {
                        self.accept(next);
                        Ok(())
                    }
                    Ok(was_live) => Err(format!("expire answered {was_live}, expected {expected}")),
                    Err(err) => self.failed(&err, next, &[key]),
                }
            }
            Step::MarkSeen { key, ttl } => {
                let key = key_of(key);
                let ttl = ttl_of(ttl);
                let expected = next.mark_seen(&key, millis(ttl.unwrap_or(TTL)), now);
                let store = self.store()?;
                let result = match ttl {
                    Some(ttl) => store.mark_seen_with_ttl(&key, ttl),
                    None => store.mark_seen(&key),
                };
                match result {
                    Ok(first) if first == expected => {
                        self.accept(next);
                        Ok(())
                    }
                    Ok(first) => Err(format!("mark_seen answered {first}, expected {expected}")),
                    Err(err) => self.failed(&err, next, &[key]),
                }
            }
            Step::MarkSeenMany { keys } => {
                let keys: Vec<Vec<u8>> = keys.iter().map(|key| key_of(*key)).collect();
                let expected: Vec<bool> = keys
                    .iter()
                    .map(|key| next.mark_seen(key, millis(TTL), now))
                    .collect();
                match self.store()?.mark_seen_many(&keys) {
                    Ok(answers) if answers == expected => {
                        self.accept(next);
                        Ok(())
                    }
                    Ok(answers) => Err(format!(
                        "mark_seen_many answered {answers:?}, expected {expected:?}"
                    )),
                    Err(err) => self.failed(&err, next, &keys),
                }
            }
            Step::Get { key } => {
                let key = key_of(key);
                let expected = self.model.entry(&key, now);
                match self.store()?.get(&key) {
                    Ok(entry) if entry == expected => Ok(()),
                    Ok(entry) => Err(format!("get answered {entry:#?}, expected {expected:#?}")),
                    Err(err) => self.failed(&err, next, &[]),
                }
            }
            Step::Sweep => {
                let expected = next.sweep(now);
                match self.store()?.sweep() {
                    Ok(removed) if removed == expected => {
                        self.accept(next);
                        Ok(())
                    }
                    Ok(removed) => Err(format!("sweep removed {removed}, expected {expected}")),
                    Err(err) => self.failed(&err, next, &[]),
                }
            }
            Step::Tick { secs } => {
                self.clock.advance(Duration::from_secs(u64::from(secs)));
                Ok(())
            }
            Step::Leap { kind } => {
                match kind % 3 {
                    0 => self.clock.advance(Duration::from_secs(24 * 3600)),
                    1 => self.clock.rewind(Duration::from_secs(3600)),
                    _ => self.clock.rewind(Duration::from_secs(60)),
                }
                Ok(())
            }
            Step::Reopen => self.reopen(),
            Step::Fail {
                call,
                nth,
                times,
                failure,
            } => {
                if self.honour_steps {
                    self.disk.arm(Fault {
                        call,
                        nth: u64::from(nth % 16) + 1,
                        times: u64::from(times % 3) + 1,
                        failure,
                    });
                }
                Ok(())
            }
            Step::PowerCut { at_sync, seed } => {
                if !self.honour_steps {
                    return Ok(());
                }
                let fate = fate_of(seed);
                if at_sync % 8 == 0 {
                    self.disk.cut_power(fate);
                    self.recover(None)
                } else {
                    self.disk.cut_power_at_sync(u64::from(at_sync % 8), fate);
                    Ok(())
                }
            }
        }
    }

    /// `complete`, `release` and `extend`: the owner check decides; refusals change nothing.
    fn owner_call(
        &mut self,
        result: crate::Result<()>,
        expected: Result<(), Refusal>,
        next: Model,
        key: Vec<u8>,
    ) -> Result<(), String> {
        match (result, expected) {
            (Ok(()), Ok(())) => {
                self.accept(next);
                Ok(())
            }
            (Err(Error::LeaseLost { .. }), Err(Refusal::LeaseLost)) => Ok(()),
            (Err(err), _) if err.is_storage() || matches!(err, Error::Closed) => {
                self.failed(&err, next, &[key])
            }
            (result, expected) => Err(format!("answered {result:?}, expected {expected:?}")),
        }
    }
}
