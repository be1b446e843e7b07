//! Recovery points for multi-step work: a checkout that creates an order, charges the card and
//! sends a mail. The first worker dies after charging; the next one takes over, sees the
//! checkpoint, and sends the mail without creating a second order or charging twice.
//!
//! Run with `cargo run --example checkout`.

use std::time::Duration;

use dedupe_store::{Claim, ClaimOptions, Store, Ticket};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The steps in order. Each checkpoint names the last one finished.
const STEPS: [&str; 3] = ["create-order", "charge-card", "send-mail"];

/// The state carried from step to step: here, the ids the earlier steps produced.
fn perform(step: &str, state: &mut Vec<String>) {
    let id = match step {
        "create-order" => "order=991".to_string(),
        "charge-card" => format!("charge=ch_for_{}", state.join(",")),
        _ => "mail=sent".to_string(),
    };
    println!("    doing {step:<12} -> {id}");
    state.push(id);
}

/// Runs the steps after the ticket's checkpoint. `die_after` stops the worker mid-way, as a
/// crash would: no release, no complete, just silence until the lease runs out.
fn checkout(store: &Store, ticket: &Ticket, die_after: Option<&str>) -> Result<Option<String>> {
    let (first, mut state) = match ticket.checkpoint() {
        Some(checkpoint) => {
            let done = STEPS
                .iter()
                .position(|s| *s == checkpoint.step)
                .ok_or("unknown step")?;
            let state: Vec<String> = String::from_utf8(checkpoint.state.clone())?
                .split('\n')
                .map(str::to_string)
                .collect();
            println!("    resuming after {:?} with {state:?}", checkpoint.step);
            (done + 1, state)
        }
        None => (0, Vec::new()),
    };
    for step in &STEPS[first..] {
        perform(step, &mut state);
        store.checkpoint(ticket, step, state.join("\n"))?;
        if die_after == Some(*step) {
            println!("    the worker dies here");
            return Ok(None);
        }
    }
    let receipt = state.join(", ");
    store.complete(ticket, &receipt)?;
    Ok(Some(receipt))
}

fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::builder()
        .lease(Duration::from_millis(200))
        .open(dir.path().join("checkout.redb"))?;
    let request = ClaimOptions::new().fingerprint(b"cart=3 items, total=42.00");

    println!("worker 1:");
    let Claim::Acquired(ticket) = store.claim_with("checkout/cart-77", &request)? else {
        return Err("cart-77 should be new".into());
    };
    checkout(&store, &ticket, Some("charge-card"))?;

    println!("worker 2 (a retry of the same request):");
    // It waits for worker 1's lease to run out, then takes over.
    match store.claim_or_wait("checkout/cart-77", &request, Duration::from_secs(5))? {
        Claim::Acquired(ticket) => {
            println!(
                "    took over (attempt {}, fencing token {})",
                ticket.attempt(),
                ticket.fencing_token()
            );
            if let Some(receipt) = checkout(&store, &ticket, None)? {
                println!("    completed: {receipt}");
            }
        }
        other => return Err(format!("expected a takeover, got {other:?}").into()),
    }

    println!("worker 3 (another retry):");
    if let Claim::Completed(outcome) = store.claim_with("checkout/cart-77", &request)? {
        println!(
            "    replayed: {} (completed by attempt {})",
            String::from_utf8_lossy(&outcome.response),
            outcome.attempt
        );
    }
    Ok(())
}
