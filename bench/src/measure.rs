//! Timings, memory readings, and the report they go into.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

pub fn per_step(total: Duration, steps: usize) -> Duration {
    total / steps.max(1) as u32
}

/// Resident memory now, from /proc (0 where there is none).
pub fn resident_bytes() -> u64 {
    status_kib("VmRSS:") * 1024
}

/// The most resident memory this process has had since the last
/// [`reset_peak_resident`].
pub fn peak_resident_bytes() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// Starts a new peak: Linux resets it when 5 is written to `clear_refs`.
pub fn reset_peak_resident() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn status_kib(field: &str) -> u64 {
    kib_field("/proc/self/status", field)
}

/// A `Field:   123 kB` line of a /proc file.
fn kib_field(file: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The machine's CPU time so far, busy and in all, summed over its cores
/// (from /proc/stat; zeros where there is none): what every process used,
/// PostgreSQL's included.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    pub fn now() -> Self {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = text
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("cpu "))
            .map(|rest| rest.split_whitespace().filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default();
        // user nice system idle iowait irq softirq steal …: idle and
        // iowait are the idle ones.
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        let total = ticks.iter().take(8).sum::<u64>();
        MachineCpu { busy: total.saturating_sub(idle), total }
    }

    /// The share of the machine's cores busy since `earlier` (0 to 1).
    pub fn busy_since(self, earlier: MachineCpu) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 { 0.0 } else { self.busy.saturating_sub(earlier.busy) as f64 / total as f64 }
    }
}

/// The time of one durable commit with the journal's settings: what a
/// chain must pay per link.
pub fn durable_commit(dir: &Path) -> anyhow::Result<Duration> {
    std::fs::create_dir_all(dir)?;
    let conn = rusqlite::Connection::open(dir.join("fsync.db"))?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    conn.execute_batch("PRAGMA synchronous = FULL; CREATE TABLE t (n INTEGER)")?;
    let commits = 200;
    let started = Instant::now();
    for n in 0..commits {
        conn.execute("INSERT INTO t VALUES (?1)", [n as i64])?;
    }
    Ok(per_step(started.elapsed(), commits))
}

/// What a ratio should be, as the issue sets it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    None,
    AtMost(f64),
    AtLeast(f64),
}

impl Target {
    fn met(self, ratio: f64) -> Option<bool> {
        match self {
            Target::None => None,
            Target::AtMost(bound) => Some(ratio <= bound),
            Target::AtLeast(bound) => Some(ratio >= bound),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Time(Duration),
    /// The time of one step, shown with the steps per second it makes.
    PerStep(Duration),
    Bytes(u64),
    Count(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub what: String,
    pub value: Value,
    /// What this row is compared with, and this value / that one (for a
    /// speedup, that one / this value).
    pub ratio: Option<(String, f64)>,
    pub target: Target,
}

impl Row {
    /// Whether the ratio meets its target; `None` without a target.
    pub fn met(&self) -> Option<bool> {
        self.ratio.as_ref().and_then(|(_, ratio)| self.target.met(*ratio))
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
}

impl Report {
    pub fn new() -> Self {
        Report::default()
    }

    pub fn time(&mut self, what: &str, value: Duration, baseline: Option<(&str, Duration)>) {
        self.compare(what, value, baseline, Target::None);
    }

    pub fn compare(&mut self, what: &str, value: Duration, baseline: Option<(&str, Duration)>, target: Target) {
        self.push_time(what, Value::Time(value), value, baseline, target);
    }

    /// A time per step; `baseline` is one too.
    pub fn step(&mut self, what: &str, value: Duration, baseline: Option<(&str, Duration)>, target: Target) {
        self.push_time(what, Value::PerStep(value), value, baseline, target);
    }

    /// A time per step, faster than `baseline` by the ratio shown: that
    /// one's time over this one's (a throughput multiple).
    pub fn speedup(&mut self, what: &str, value: Duration, baseline: (&str, Duration), target: Target) {
        let (name, base) = baseline;
        let ratio = Some((name.to_owned(), base.as_secs_f64() / value.as_secs_f64().max(1e-12)));
        self.rows.push(Row { what: what.to_owned(), value: Value::PerStep(value), ratio, target });
    }

    fn push_time(
        &mut self,
        what: &str,
        shown: Value,
        value: Duration,
        baseline: Option<(&str, Duration)>,
        target: Target,
    ) {
        let ratio = baseline.map(|(name, base)| (name.to_owned(), value.as_secs_f64() / base.as_secs_f64().max(1e-12)));
        self.rows.push(Row { what: what.to_owned(), value: shown, ratio, target });
    }

    /// A time measured in turns with a baseline named `baseline`, and the
    /// ratio the turns give (the median of each turn's own ratio, which
    /// a machine's drift from one turn to the next moves less than a
    /// ratio of two medians).
    pub fn paired(&mut self, what: &str, value: Duration, baseline: &str, ratio: f64, target: Target) {
        let ratio = Some((baseline.to_owned(), ratio));
        self.rows.push(Row { what: what.to_owned(), value: Value::Time(value), ratio, target });
    }

    /// A count, with its ratio to `baseline`'s when given.
    pub fn count(&mut self, what: &str, count: f64, baseline: Option<(&str, f64)>) {
        let ratio = baseline.map(|(name, base)| (name.to_owned(), count / base.max(1e-12)));
        self.rows.push(Row { what: what.to_owned(), value: Value::Count(count), ratio, target: Target::None });
    }

    pub fn bytes(&mut self, what: &str, bytes: u64, baseline: Option<(&str, u64)>, target: Target) {
        let ratio = baseline.map(|(name, base)| (name.to_owned(), bytes as f64 / base.max(1) as f64));
        self.rows.push(Row { what: what.to_owned(), value: Value::Bytes(bytes), ratio, target });
    }

    /// The table, with the machine it ran on.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines().find_map(|l| {
                    l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
                })
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let memory = kib_field("/proc/meminfo", "MemTotal:") as f64 / (1024.0 * 1024.0);
        let _ = writeln!(out, "machine: {cpu}, {cores} cores, {memory:.0} GiB\n");
        let _ = writeln!(out, "| measurement | value | ratio | to | target |");
        let _ = writeln!(out, "| --- | ---: | ---: | --- | --- |");
        for row in &self.rows {
            let value = match row.value {
                Value::PerStep(time) => {
                    format!("{} ({:.0} steps/s)", duration(time), 1.0 / time.as_secs_f64().max(1e-12))
                }
                Value::Time(time) => duration(time),
                Value::Bytes(bytes) => format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0)),
                Value::Count(count) if count >= 1000.0 => format!("{count:.0}"),
                Value::Count(count) => format!("{count:.3}"),
            };
            let (ratio, to) = match &row.ratio {
                Some((name, ratio)) => (format!("{ratio:.2}×"), name.as_str()),
                None => (String::new(), ""),
            };
            let target = match (row.target, row.met()) {
                (Target::AtMost(bound), Some(met)) => format!("≤ {bound}× {}", if met { "met" } else { "**missed**" }),
                (Target::AtLeast(bound), Some(met)) => format!("≥ {bound}× {}", if met { "met" } else { "**missed**" }),
                _ => String::new(),
            };
            let _ = writeln!(out, "| {} | {value} | {ratio} | {to} | {target} |", row.what);
        }
        out
    }
}

/// The `p`th fraction of `samples` (sorted here).
pub fn percentile(samples: &mut [f64], p: f64) -> Duration {
    samples.sort_by(f64::total_cmp);
    let index = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len().max(1)) - 1;
    Duration::from_secs_f64(samples.get(index).copied().unwrap_or_default().max(0.0) / 1000.0)
}

/// µs below 10 ms, ms above.
fn duration(time: Duration) -> String {
    if time < Duration::from_millis(10) {
        format!("{:.1} µs", time.as_secs_f64() * 1e6)
    } else {
        format!("{:.1} ms", time.as_secs_f64() * 1e3)
    }
}
