//! The socket under tungstenite, with a read buffer that exists only while bytes wait in it.
//!
//! tungstenite 0.29's `FrameCodec` (`protocol/frame/mod.rs`) makes its input buffer with the
//! capacity `read_buffer_size`, zero-fills it up to `read_buffer_size` bytes before every read
//! (`read_in`: `resize(capacity.min(len + in_buf_max_read), 0)`) and never shrinks it; the
//! same size is the most it asks the socket for in one read. So its buffer is touched memory
//! on every connection from the first poll on, idle or not, and a small one would mean one
//! system call per few hundred bytes.
//!
//! Here tungstenite gets a small buffer ([`TUNGSTENITE_READ`]) and reads from this wrapper,
//! which reads the socket in [`CHUNK`]-byte reads into a buffer allocated when a read starts
//! and freed as soon as tungstenite has taken everything in it (or the socket had nothing).
//! An idle connection holds no read-ahead buffer; a busy one makes one system call per
//! [`CHUNK`] bytes, as with tungstenite's own 4 KiB buffer before.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// tungstenite's own read buffer (`read_buffer_size`): what every connection keeps touched.
pub(crate) const TUNGSTENITE_READ: usize = 256;

/// Bytes asked of the socket per read.
pub(crate) const CHUNK: usize = 8 * 1024;

#[derive(Debug)]
pub(crate) struct ReadAhead<T> {
    io: T,
    /// Read from the socket, not yet taken by tungstenite; no allocation while empty.
    buf: BytesMut,
}

impl<T> ReadAhead<T> {
    pub(crate) fn new(io: T) -> Self {
        ReadAhead {
            io,
            buf: BytesMut::new(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            if out.remaining() >= CHUNK {
                // A reader with room for a whole chunk needs no read-ahead (tungstenite, asking
                // for TUNGSTENITE_READ bytes at a time, never has).
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            // Allocated before the read, freed at once if the socket has nothing: one
            // allocation and free per poll of an idle socket (tokio answers `Pending` from its
            // cached readiness without a system call).
            this.buf.reserve(CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Ready(Ok(_)) => {}
                other => {
                    // Nothing read (idle, closed or failed): nothing is kept.
                    this.buf = BytesMut::new();
                    return other.map_ok(|_| ());
                }
            }
            if this.buf.is_empty() {
                // End of stream.
                this.buf = BytesMut::new();
                return Poll::Ready(Ok(()));
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() {
            this.buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
