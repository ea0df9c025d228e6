//! Process-death evidence beside a replication session: one TCP connection per QUIC session.
//!
//! Heartbeats tell a silent peer from a live one only after a timeout. When the peer *process*
//! dies (a crash, `kill -9`) but its host lives on, that host's kernel closes the process's TCP
//! sockets at once: the other side reads end-of-file (or a reset) within a round trip. So the
//! primary opens, next to each QUIC session, a TCP connection to the same address and port
//! (TCP instead of UDP) and both ends hold it open and silent. Each end, when it is done with the
//! session on purpose, first writes a goodbye byte; an end of stream **without** the goodbye
//! means the other process is gone, and is reported as [`End::Died`].
//!
//! The connection is bound to its QUIC session by a token both ends derive from the session's
//! TLS secrets ([`crate::Connection::keying_material`] under [`LABEL`]): a third party cannot
//! attach a line to somebody else's session, so it cannot fake a death. It is evidence for
//! detection only: arbitration still waits out the old primary's lease before it grants, so a
//! wrong verdict cannot make two active copies (`docs/failure-model.md`). A host that dies
//! whole (power, kernel panic) or a partition closes nothing; heartbeats catch those.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};

/// The TLS exporter label of the token.
pub const LABEL: &[u8] = b"understudy liveness v1";
const MAGIC: &[u8; 8] = b"USLIVE01";
const BYE: u8 = 0xB7;
/// How many authenticated lines may wait for their session at once.
const MAX_WAITING: usize = 16;
/// How long a new connection has to present its token.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// How a line ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The peer said goodbye: it ended the session on purpose.
    Bye,
    /// The stream ended without a goodbye: the peer's process is gone.
    Died(String),
}

/// One held line. Dropping it says goodbye (best effort) and closes it.
pub struct Line {
    bye: Option<oneshot::Sender<()>>,
    ended: Option<oneshot::Receiver<End>>,
}

impl Line {
    fn spawn(stream: TcpStream) -> Self {
        let (bye_tx, bye_rx) = oneshot::channel::<()>();
        let (end_tx, end_rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut rd, mut wr) = stream.into_split();
            let mut buf = [0u8; 64];
            tokio::select! {
                r = rd.read(&mut buf) => {
                    let end = match r {
                        Ok(n) if n > 0 && buf[..n].contains(&BYE) => End::Bye,
                        Ok(0) => End::Died("the peer's host closed the connection without a goodbye".into()),
                        Ok(_) => End::Died("the peer wrote garbage on the liveness line".into()),
                        Err(e) => End::Died(format!("the liveness connection failed: {e}")),
                    };
                    let _ = end_tx.send(end);
                }
                _ = bye_rx => {
                    let _ = wr.write_all(&[BYE]).await;
                    let _ = wr.shutdown().await;
                }
            }
        });
        Self { bye: Some(bye_tx), ended: Some(end_rx) }
    }

    /// Waits until the peer ends the line. Resolves once; later calls never resolve.
    pub async fn ended(&mut self) -> End {
        match self.ended.take() {
            Some(rx) => rx.await.unwrap_or(End::Bye),
            None => std::future::pending().await,
        }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if let Some(tx) = self.bye.take() {
            let _ = tx.send(());
        }
    }
}

/// The primary's side: connects to the backup at `addr` (the QUIC listen address, over TCP)
/// and presents the session's token.
pub async fn connect(addr: SocketAddr, token: [u8; 32]) -> std::io::Result<Line> {
    let mut stream = tokio::time::timeout(HELLO_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "liveness connect timed out"))??;
    stream.set_nodelay(true)?;
    let mut hello = [0u8; 40];
    hello[..8].copy_from_slice(MAGIC);
    hello[8..].copy_from_slice(&token);
    stream.write_all(&hello).await?;
    Ok(Line::spawn(stream))
}

/// Authenticated lines waiting for their session: `(token, stream)`.
type Waiting = Arc<Mutex<VecDeque<([u8; 32], TcpStream)>>>;

/// The primary's side of `session`: holds its line to the backup at `addr` until the backup
/// ends it. Never resolves when there is no line (no token, no TCP path to the backup): then
/// heartbeats alone decide.
/// The token is taken from `session` at once: the future does not keep the connection alive.
pub fn hold(addr: SocketAddr, session: &crate::Connection) -> impl std::future::Future<Output = End> + Send + 'static {
    let token = session.keying_material(LABEL);
    async move {
        let Some(token) = token else { return std::future::pending().await };
        match connect(addr, token).await {
            Ok(mut line) => line.ended().await,
            Err(e) => {
                tracing::info!(%addr, "liveness: no line to the backup ({e}): detection by heartbeats only");
                std::future::pending().await
            }
        }
    }
}

/// The backup's side: accepts lines and hands each to the session whose token it presents.
pub struct Listener {
    waiting: Waiting,
    arrived: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
    local: SocketAddr,
}

impl Listener {
    /// Listens on `addr` (TCP).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let waiting: Waiting = Arc::default();
        let arrived = Arc::new(Notify::new());
        let (w, a) = (Arc::clone(&waiting), Arc::clone(&arrived));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let (w, a) = (Arc::clone(&w), Arc::clone(&a));
                tokio::spawn(async move {
                    let mut hello = [0u8; 40];
                    match tokio::time::timeout(HELLO_TIMEOUT, stream.read_exact(&mut hello)).await {
                        Ok(Ok(_)) if &hello[..8] == MAGIC => {
                            let _ = stream.set_nodelay(true);
                            let token: [u8; 32] = hello[8..].try_into().expect("32 bytes");
                            let mut q = w.lock().unwrap_or_else(|e| e.into_inner());
                            if q.len() >= MAX_WAITING {
                                q.pop_front();
                            }
                            q.push_back((token, stream));
                            drop(q);
                            a.notify_waiters();
                        }
                        _ => tracing::warn!(%peer, "liveness: refused a connection without a valid hello"),
                    }
                });
            }
        });
        Ok(Self { waiting, arrived, task, local })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Watches the line of `session`: resolves when the primary ends it. Never resolves when
    /// the session has no token or its primary opens no line.
    pub fn watch(&self, session: &crate::Connection) -> impl std::future::Future<Output = End> + '_ {
        let token = session.keying_material(LABEL);
        async move {
            match token {
                Some(token) => self.accept_for(token).await.ended().await,
                None => std::future::pending().await,
            }
        }
    }

    /// Waits for the line of the session whose token is `token`.
    pub async fn accept_for(&self, token: [u8; 32]) -> Line {
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut q = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(i) = q.iter().position(|(t, _)| constant_time_eq(t, &token)) {
                    let (_, stream) = q.remove(i).expect("index found");
                    return Line::spawn(stream);
                }
            }
            notified.await;
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: [u8; 32] = [7; 32];

    async fn listener() -> (Listener, SocketAddr) {
        let l = Listener::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr();
        (l, addr)
    }

    async fn within<F: std::future::Future>(ms: u64, f: F) -> Option<F::Output> {
        tokio::time::timeout(Duration::from_millis(ms), f).await.ok()
    }

    #[tokio::test]
    async fn goodbye_is_not_death() {
        let (l, addr) = listener().await;
        let primary = connect(addr, T).await.unwrap();
        let mut backup = within(2000, l.accept_for(T)).await.expect("line accepted");
        drop(primary);
        assert_eq!(within(2000, backup.ended()).await, Some(End::Bye));
    }

    #[tokio::test]
    async fn a_close_without_goodbye_is_death_both_ways() {
        let (l, addr) = listener().await;
        // The primary's process dies: its kernel closes the socket, nobody says goodbye.
        let mut raw = TcpStream::connect(addr).await.unwrap();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&T);
        raw.write_all(&hello).await.unwrap();
        let mut backup = within(2000, l.accept_for(T)).await.expect("line accepted");
        drop(raw);
        assert!(matches!(within(2000, backup.ended()).await, Some(End::Died(_))));

        // The backup's process dies under a primary's line.
        let raw_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a2 = raw_listener.local_addr().unwrap();
        let accept = tokio::spawn(async move { raw_listener.accept().await.unwrap().0 });
        let mut primary = connect(a2, T).await.unwrap();
        drop(accept.await.unwrap());
        assert!(matches!(within(2000, primary.ended()).await, Some(End::Died(_))));
    }

    #[tokio::test]
    async fn a_wrong_token_or_garbage_attaches_nothing() {
        let (l, addr) = listener().await;
        let _wrong = connect(addr, [8; 32]).await.unwrap();
        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage.write_all(&[0u8; 40]).await.unwrap();
        assert!(within(300, l.accept_for(T)).await.is_none(), "no line for a token nobody presented");
        // The right one still gets through afterwards.
        let _right = connect(addr, T).await.unwrap();
        assert!(within(2000, l.accept_for(T)).await.is_some());
    }
}
