//! What one durable redb commit costs as it carries more keys: the ceiling of group commit.
//!
//! Raw redb, one table of 100k keys, one durable commit inserting 1, 8, 32 or 64 keys, either
//! scattered over the tree (as idempotency keys are: each lands in its own leaf page, which the
//! commit must write and fsync) or appended in key order (all in the same few pages). Group
//! commit turns N fsyncs into one, but not N page writes into one: with scattered keys the
//! cost per key levels off at about one page write, and that bounds durable claims per second
//! whatever the batching. `cargo bench -p dedupe-store-benches --bench commit_cost`.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use redb::{Database, TableDefinition};

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const VALUE: [u8; 60] = [7; 60];
const PRELOAD: u64 = 100_000;

/// xorshift64: scattered keys without a dependency.
fn scatter(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Database::create(dir.path().join("commit_cost.redb")).expect("create");
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let txn = db.begin_write().expect("begin_write");
    {
        let mut table = txn.open_table(TABLE).expect("open table");
        for _ in 0..PRELOAD {
            table
                .insert(&scatter(&mut state).to_be_bytes()[..], &VALUE[..])
                .expect("insert");
        }
    }
    txn.commit().expect("commit");

    let mut group = c.benchmark_group("commit_cost");
    group
        .sample_size(20)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    // Appended keys are 16 bytes starting with eight 0xFF: after every preloaded 8-byte key.
    let mut appended = 0u64;
    for keys in [1u64, 8, 32, 64] {
        group.throughput(Throughput::Elements(keys));
        for layout in ["scattered", "appended"] {
            group.bench_function(BenchmarkId::new(layout, keys), |b| {
                b.iter(|| {
                    let txn = db.begin_write().expect("begin_write");
                    {
                        let mut table = txn.open_table(TABLE).expect("open table");
                        for _ in 0..keys {
                            let key = if layout == "scattered" {
                                scatter(&mut state)
                            } else {
                                appended += 1;
                                appended
                            };
                            table
                                .insert(&key.to_be_bytes()[..], &VALUE[..])
                                .expect("insert");
                        }
                    }
                    txn.commit().expect("commit");
                })
            });
        }
    }
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().without_plots().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
}
