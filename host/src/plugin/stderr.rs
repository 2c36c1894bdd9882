//! A plugin's stderr, kept: the last [`TAIL_BYTES`] a call wrote.
//!
//! A Rust panic or an uncaught Python exception reaches the host only as a
//! trap ("wasm `unreachable` instruction executed"); its message went to
//! stderr. Every instance's stderr goes to a [`StderrTail`], whether or not
//! the plugin was granted stdio (with the grant, it is also copied to the
//! host's stderr), so a failed call's error can end with what the plugin said.
//!
//! Guarantees: writes never block and never fail; the tail holds at most
//! [`TAIL_BYTES`] (older bytes are dropped first); each call starts empty.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// How much of a call's stderr is kept.
pub const TAIL_BYTES: usize = 4096;

/// The end of what an instance wrote to stderr. Cheap to clone; clones share.
#[derive(Clone, Default)]
pub struct StderrTail {
    buf: Arc<Mutex<VecDeque<u8>>>,
    /// Also copy to the host's stderr (the plugin was granted stdio).
    forward: bool,
}

impl StderrTail {
    pub fn new(forward: bool) -> Self {
        Self {
            buf: Arc::default(),
            forward,
        }
    }

    fn buf(&self) -> MutexGuard<'_, VecDeque<u8>> {
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, bytes: &[u8]) {
        if self.forward {
            let _ = std::io::stderr().write_all(bytes);
        }
        let mut buf = self.buf();
        let bytes = &bytes[bytes.len().saturating_sub(TAIL_BYTES)..];
        let overflow = (buf.len() + bytes.len()).saturating_sub(TAIL_BYTES);
        buf.drain(..overflow);
        buf.extend(bytes);
    }

    /// Forget what was written (at the start of a call).
    pub fn clear(&self) {
        self.buf().clear();
    }

    /// What was written since the last [`clear`](Self::clear), trimmed; lossy
    /// UTF-8.
    pub fn text(&self) -> String {
        let buf = self.buf();
        let (a, b) = buf.as_slices();
        let bytes = [a, b].concat();
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// `message`, followed by the stderr tail if there is one.
    pub fn explain(&self, message: String) -> String {
        let tail = self.text();
        if tail.is_empty() {
            message
        } else {
            format!("{message}; the plugin's stderr ended with: {tail}")
        }
    }
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StderrTail {
    async fn ready(&mut self) {}
}

impl OutputStream for StderrTail {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for StderrTail {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        bytes: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(bytes);
        std::task::Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_tail_keeps_the_last_bytes_and_starts_empty_after_clear() {
        let tail = StderrTail::new(false);
        assert_eq!(tail.explain("trap".into()), "trap");
        let mut stream = tail.clone();
        stream.write(Bytes::from(vec![b'a'; TAIL_BYTES])).unwrap();
        stream
            .write(Bytes::from_static(b"panicked at src/lib.rs: boom\n"))
            .unwrap();
        let text = tail.text();
        assert_eq!(text.len(), TAIL_BYTES - 1, "bounded, trimmed");
        assert!(text.ends_with("panicked at src/lib.rs: boom"), "{text}");
        assert!(
            tail.explain("trap".into())
                .starts_with("trap; the plugin's stderr ended with: a")
        );
        tail.clear();
        assert_eq!(tail.text(), "");
        stream
            .write(Bytes::from(vec![b'z'; 3 * TAIL_BYTES]))
            .unwrap();
        assert_eq!(tail.text().len(), TAIL_BYTES);
    }
}
