//! Open client connections, counted so that shutdown can wait for them.
//!
//! tonic's server future resolves once every stream has handed its last
//! frame to the HTTP/2 connection, but those frames may still wait in the
//! connection's send buffer for the client's flow-control window. Exiting
//! then resets the connection and the client loses the end of its result.
//! Each accepted socket carries a guard; shutdown waits until every socket
//! has been closed by its connection task (or the grace period ends).
//!
//! Closing is lingering: a socket closed while the client's last frames
//! (window updates, pings) sit unread in it makes the kernel send a reset,
//! which discards what the client has not read yet. So a dropped socket is
//! handed to a task that sends FIN and reads until the client closes too
//! (at most [`LINGER`]) before it is released and stops counting.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The number of open connections.
#[derive(Clone, Default)]
pub struct OpenConnections(Arc<AtomicUsize>);

impl OpenConnections {
    /// Wraps an accepted socket so that it counts while open.
    pub fn track(&self, inner: TcpStream) -> TrackedStream {
        self.0.fetch_add(1, Ordering::SeqCst);
        TrackedStream {
            inner: Some(inner),
            open: self.clone(),
        }
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Waits until no connection is open, up to `limit`; returns how many
    /// are still open.
    pub async fn drained(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        while self.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.count()
    }
}

/// How long a closed socket waits for the client to close its side.
pub const LINGER: Duration = Duration::from_secs(5);

/// A client socket that is counted until it is closed on both sides.
pub struct TrackedStream {
    inner: Option<TcpStream>,
    open: OpenConnections,
}

impl TrackedStream {
    fn socket(&mut self) -> &mut TcpStream {
        self.inner
            .as_mut()
            .expect("the socket is present until drop")
    }
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        let open = self.open.clone();
        let socket = self.inner.take();
        let linger = async move {
            if let Some(mut socket) = socket {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = socket.shutdown().await;
                let mut sink = [0u8; 4096];
                let _ = tokio::time::timeout(LINGER, async {
                    while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
            }
            open.0.fetch_sub(1, Ordering::SeqCst);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(linger);
            }
            Err(_) => {
                self.open.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl Connected for TrackedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner
            .as_ref()
            .expect("the socket is present until drop")
            .connect_info()
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.socket()).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.socket()).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.socket()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.socket()).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.socket()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }
}
