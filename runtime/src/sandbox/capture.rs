//! Capped capture of a guest's stdout or stderr: the first bytes are kept,
//! the rest is counted and dropped, and the guest never sees an error (a
//! step that logs a lot should not fail because of it). Secrets are
//! redacted before the capture is cut to its cap, so the pipe keeps as many
//! bytes past the cap as the longest secret has: a secret that crosses the
//! cut is seen whole, and replaced.

use std::io;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::Mutex;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

use super::host_memory::HostMemory;
use super::redact::Redactor;
use crate::run::Captured;

#[derive(Debug, Default)]
struct Buffer {
    kept: Vec<u8>,
    dropped: u64,
}

/// A shared, capped buffer; clones write to the same buffer.
#[derive(Debug, Clone)]
pub(crate) struct CappedPipe {
    capacity: usize,
    /// Bytes kept past the cap, so a secret crossing it can be redacted.
    overhang: usize,
    buffer: Arc<Mutex<Buffer>>,
    /// What the kept bytes are charged to, and under which name.
    memory: HostMemory,
    name: &'static str,
}

impl CappedPipe {
    /// Keeps `capacity` bytes of what is written, redacting secrets of up
    /// to `overhang` bytes across the cut; the kept bytes are charged to
    /// `memory` as `name`.
    pub(crate) fn new(capacity: usize, overhang: usize, memory: HostMemory, name: &'static str) -> Self {
        CappedPipe { capacity, overhang, buffer: Arc::default(), memory, name }
    }

    /// Keeps what fits; fails when the attempt's host memory cannot hold
    /// it, which ends the attempt.
    fn append(&self, bytes: &[u8]) -> Result<(), super::host_memory::HostMemorySpent> {
        let mut buffer = self.buffer.lock();
        let room = self.capacity.saturating_add(self.overhang).saturating_sub(buffer.kept.len());
        let kept = bytes.len().min(room);
        self.memory.take(kept, self.name)?;
        buffer.kept.extend_from_slice(&bytes[..kept]);
        buffer.dropped += (bytes.len() - kept) as u64;
        Ok(())
    }

    /// What was captured, with `redactor`'s secrets replaced, cut to the
    /// cap.
    pub(crate) fn captured(&self, redactor: &Redactor) -> Captured {
        let buffer = self.buffer.lock();
        let mut text = redactor.text(&String::from_utf8_lossy(&buffer.kept));
        let written = buffer.kept.len() as u64 + buffer.dropped;
        let dropped = if buffer.dropped == 0 && text.len() <= self.capacity {
            0
        } else {
            text.truncate(text.floor_char_boundary(self.capacity));
            written.saturating_sub(self.capacity as u64).max(1)
        };
        if dropped > 0 {
            if !text.ends_with('\n') && !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&format!("[... {dropped} more bytes dropped]"));
        }
        Captured { text, dropped_bytes: dropped }
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.append(&bytes).map_err(|spent| StreamError::Trap(spent.into()))
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always ready: what does not fit is dropped, not refused.
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl AsyncWrite for CappedPipe {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(self.append(buf).map(|()| buf.len()).map_err(io::Error::other))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roomy() -> HostMemory {
        HostMemory::new(bytesize::ByteSize::mib(1))
    }

    #[test]
    fn kept_bytes_are_charged_and_a_write_past_the_budget_fails() {
        let memory = HostMemory::new(bytesize::ByteSize::b(10));
        let pipe = CappedPipe::new(100, 0, memory.clone(), "stdout");
        pipe.append(b"12345678").unwrap();
        assert!(pipe.append(b"abc").is_err());
        assert!(memory.refused().unwrap().contains("(stdout)"));
    }

    #[test]
    fn keeps_the_first_bytes_and_counts_the_rest() {
        let pipe = CappedPipe::new(4, 0, roomy(), "stdout");
        pipe.append(b"abc").unwrap();
        pipe.append(b"defg").unwrap();
        let captured = pipe.captured(&Redactor::default());
        assert_eq!(captured.text, "abcd\n[... 3 more bytes dropped]");
        assert_eq!(captured.dropped_bytes, 3);
    }

    #[test]
    fn a_secret_across_the_cut_leaves_nothing_of_itself() {
        let secret = "hunter2".to_owned();
        let redactor = Redactor::new([&secret]);
        let pipe = CappedPipe::new(6, redactor.longest(), roomy(), "stdout");
        pipe.append(b"abcdhunter2 and more").unwrap();
        let captured = pipe.captured(&redactor);
        assert_eq!(captured.text, "abcd[r\n[... 14 more bytes dropped]");
        assert!(!captured.text.contains("hu"), "{}", captured.text);
    }
}
