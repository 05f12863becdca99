//! What the group-committing journal writers of both stores share: how a
//! record is waited for, and how records gather into one commit.

use std::time::Duration;

/// Records committed together at most; bounds how long one commit holds the
/// database.
pub(crate) const MAX_BATCH: usize = 1024;

/// The longest a lazy record waits for an awaited one. A crash in this
/// window loses finish records, never start records: the attempts they
/// finished count as interrupted and run again on resume.
pub(crate) const LAZY_WINDOW: Duration = Duration::from_millis(2);

/// How a record is waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Nobody waits for it; a later awaited record of its run vouches for it.
    Lazy,
    /// Someone waits for it, so it commits as soon as the database allows.
    Awaited,
    /// The run's last record (awaited): after it, the run's failure is
    /// forgotten, so the same process can resume the run.
    Last,
}
