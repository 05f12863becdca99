//! How the CLI prints runs: the step table of `stepbox run` and `stepbox
//! show`, and the attempts of `stepbox logs`. Both read a
//! [`RunReport`], whether it was just run or read back from the journal.

use std::time::Duration;

use bytesize::ByteSize;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};

use crate::run::{Attempt, RunReport, StepReport, StepStatus};

/// Step, status, attempts, duration, fuel, peak memory, error; the steps of
/// included workflows follow their include step.
pub(crate) fn steps_table(report: &RunReport) -> Table {
    let mut table = Table::new();
    table
        .load_style(UTF8_BORDERS_ONLY)
        .set_header(["step", "status", "attempts", "duration", "fuel", "memory", "error"]);
    fn add(table: &mut Table, step: &StepReport) {
        let status = if step.required { step.status.to_string() } else { format!("{} (optional)", step.status) };
        // Skipped steps and includes ran no attempts of their own.
        let attempts = step.attempts().count();
        let if_ran = |text: String| if attempts > 0 { text } else { String::new() };
        let error = match step.status {
            StepStatus::Succeeded => None,
            _ => step
                .reason
                .clone()
                .or_else(|| step.attempts().filter_map(Attempt::failure).last().map(|f| f.to_string())),
        };
        table.add_row([
            step.id.to_string(),
            status,
            if_ran(attempts.to_string()),
            step.duration_ms().map(|ms| format!("{:.1?}", millis(ms))).unwrap_or_default(),
            if_ran(step.fuel_consumed().to_string()),
            if_ran(ByteSize(step.peak_memory()).display().iec().to_string()),
            error.unwrap_or_default(),
        ]);
        for child in &step.steps {
            add(table, child);
        }
    }
    for step in &report.steps {
        add(&mut table, step);
    }
    table
}

/// Milliseconds as a duration, for printing.
pub(crate) fn millis(ms: f64) -> Duration {
    Duration::from_secs_f64(ms.max(0.0) / 1000.0)
}

/// Unix milliseconds as an RFC 3339 time, to the second.
pub(crate) fn when(ms: f64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + millis(ms)).to_string()
}

/// One attempt's logs, stdout and stderr, and how it failed.
pub(crate) fn print_attempt(step: &StepReport, key: &str, attempt: &Attempt) {
    println!("== {} attempt {} ({key}) — {}", step.id, attempt.attempt, attempt.outcome.as_str());
    for record in &attempt.logs {
        println!("[{}] {}: {}", record.level, printable(&record.context), printable(&record.message));
    }
    for (name, captured) in [("stdout", &attempt.stdout), ("stderr", &attempt.stderr)] {
        if !captured.text.is_empty() {
            println!("--- {name}\n{}", printable(captured.text.trim_end()));
        }
    }
    if let Some(failure) = attempt.failure() {
        println!("failed ({}): {}", failure.kind, printable(&failure.message));
    }
}

/// Guest text made safe for a terminal: control characters (escape
/// sequences that move the cursor, retitle the window or hide text) are
/// shown escaped; line breaks and tabs stay.
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return text.into();
    }
    text.chars()
        .map(|c| if c.is_control() && c != '\n' && c != '\t' { c.escape_default().to_string() } else { c.to_string() })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_sequences_are_shown_escaped() {
        assert_eq!(super::printable("a\x1b[2Jb\n\tc\u{9b}"), "a\\u{1b}[2Jb\n\tc\\u{9b}");
        assert_eq!(super::printable("plain"), "plain");
    }
}
