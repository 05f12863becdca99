//! Failpoints: named places where a test can make the process die at once
//! (an abort, as a crash or `kill -9` would), to show that what was
//! committed survives and that nothing finished runs twice. Compiled in
//! only with the `failpoints` feature, which the test suite turns on;
//! without it [`failpoint!`] expands to nothing.
//!
//! `STEPBOX_FAILPOINT=NAME` aborts the process the first time `NAME` is
//! reached, `NAME@N` the Nth time. `STEPBOX_FAILPOINT_LOG=FILE` appends
//! the name of each failpoint to FILE each time it is reached, so a test
//! can show that it visited them all, and how often.

/// Marks a failpoint named `$name` (a string literal). A name marks one
/// place in the flow of a run; the two stores mark the same places with the
/// same names.
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoint::reached($name);
    };
}
pub(crate) use failpoint;

#[cfg(feature = "failpoints")]
pub(crate) use armed::reached;

#[cfg(feature = "failpoints")]
mod armed {
    use std::io::Write;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    use parking_lot::Mutex;

    /// What the environment asked for, read once.
    struct Armed {
        /// The failpoint to abort at, and at which of its visits.
        crash: Option<(String, u64)>,
        visits: AtomicU64,
        /// Where to note failpoints reached.
        log: Option<Mutex<std::fs::File>>,
    }

    fn armed() -> &'static Armed {
        static ARMED: OnceLock<Armed> = OnceLock::new();
        ARMED.get_or_init(|| {
            let crash = std::env::var("STEPBOX_FAILPOINT").ok().map(|spec| match spec.split_once('@') {
                Some((name, nth)) => (name.to_owned(), nth.parse().expect("STEPBOX_FAILPOINT=NAME@N takes a number")),
                None => (spec, 1),
            });
            let log = std::env::var_os("STEPBOX_FAILPOINT_LOG").map(|path| {
                let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
                Mutex::new(file.expect("STEPBOX_FAILPOINT_LOG names a file that can be written"))
            });
            Armed { crash, visits: AtomicU64::new(0), log }
        })
    }

    /// Notes that `name` was reached, and aborts if it is the one asked for.
    pub(crate) fn reached(name: &'static str) {
        let armed = armed();
        if let Some(log) = &armed.log {
            // Unbuffered: on disk before any abort.
            let _ = writeln!(log.lock(), "{name}");
        }
        if let Some((crash, nth)) = &armed.crash
            && crash == name
            && armed.visits.fetch_add(1, Ordering::SeqCst) + 1 == *nth
        {
            eprintln!("stepbox: failpoint {name}: aborting");
            std::process::abort();
        }
    }
}
