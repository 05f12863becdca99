//! CPU-bound work, for measuring what fuel and epochs cost a step.
//! `sieve`: sieves the primes below `size`, `rounds` times, and hashes them
//! (tight loops, the worst case). `json`: builds `size` records, writes
//! them as JSON and reads them back, `rounds` times (what most steps do).
use serde::{Deserialize, Serialize};
use stepbox_sdk::{StepError, step};

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Work {
    Sieve,
    Json,
}

#[derive(Deserialize)]
struct Input {
    work: Work,
    rounds: u32,
    size: usize,
}

#[derive(Serialize, Deserialize)]
struct Record {
    id: u64,
    name: String,
    tags: Vec<String>,
    price_cents: u64,
}

#[step]
fn run(input: Input) -> Result<u64, StepError> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |value: u64| hash = (hash ^ value).wrapping_mul(0x100_0000_01b3);
    for round in 0..u64::from(input.rounds) {
        match input.work {
            Work::Sieve => {
                let mut composite = vec![false; input.size];
                for n in 2..input.size {
                    if composite[n] {
                        continue;
                    }
                    mix(n as u64 + round);
                    for multiple in (n * n..input.size).step_by(n) {
                        composite[multiple] = true;
                    }
                }
            }
            Work::Json => {
                let records: Vec<Record> = (0..input.size as u64)
                    .map(|id| Record {
                        id,
                        name: format!("item {id} of round {round}"),
                        tags: vec!["a".repeat((id % 7) as usize), format!("t{}", id % 13)],
                        price_cents: id * 31 + round,
                    })
                    .collect();
                let text = serde_json::to_string(&records).map_err(|err| StepError::fatal(err.to_string()))?;
                let back: Vec<Record> = serde_json::from_str(&text).map_err(|err| StepError::fatal(err.to_string()))?;
                back.iter().for_each(|record| mix(record.price_cents + record.name.len() as u64));
            }
        }
    }
    Ok(hash)
}
