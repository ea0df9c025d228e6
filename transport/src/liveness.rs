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
//! **Authentication.** The connection is bound to its QUIC session by a token both ends derive
//! from the session's TLS secrets ([`crate::Connection::keying_material`] under [`LABEL`]). The
//! primary's hello is `USLIVE02` and the token; the backup hands the connection only to the
//! session that is watching for that token ([`Listener::watch`]), and answers [`ACK`] when it
//! does. A connection without a hello within [`HELLO_TIMEOUT`], or whose token no session
//! claims within [`CLAIM_TIMEOUT`], is closed, so a third party can neither attach a line to
//! somebody else's session (to fake a death) nor take the place of a real one. The primary counts its line as held only after the [`ACK`]: a
//! connection the backup closes before it is a refusal (no line: heartbeats alone decide), never
//! a death. Unauthenticated connections are bounded: at most [`MAX_PENDING`] at once and
//! [`MAX_PENDING_PER_ADDRESS`] from one IP address, each for at most [`CLAIM_TIMEOUT`]; more
//! are closed at once.
//!
//! A hello of the previous version (`USLIVE01`, no acknowledgement) is still served, so a
//! primary and a backup can be upgraded one at a time; a primary whose backup never answers
//! (an older one) keeps the line as that version did.
//!
//! It is evidence for detection only: arbitration still waits out the old primary's lease
//! before it grants, so a wrong verdict cannot make two active copies
//! (`docs/failure-model.md`). A host that dies whole (power, kernel panic) or a partition
//! closes nothing; heartbeats catch those.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

/// The TLS exporter label of the token.
pub const LABEL: &[u8] = b"understudy liveness v1";
/// The hello of this version: the backup answers [`ACK`].
const MAGIC: &[u8; 8] = b"USLIVE02";
/// The hello of the previous version: no answer.
const MAGIC_V1: &[u8; 8] = b"USLIVE01";
/// The backup's answer to a hello whose token a session claimed.
pub const ACK: u8 = 0xA5;
/// The backup's answer to a hello it refuses (no session claims its token): a refusal is said,
/// so that a line closed without any answer means the backup's process died before it could
/// answer.
pub const NAK: u8 = 0x5A;
const BYE: u8 = 0xB7;
/// Connections that have not (yet) shown a token a session claims, at once.
pub const MAX_PENDING: usize = 32;
/// Such connections from one IP address at once.
pub const MAX_PENDING_PER_ADDRESS: usize = 4;
/// How long a new connection has to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after it connected a session must claim a connection's token (the backup may take
/// a moment to get to a new session, e.g. while its previous one ends).
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the primary waits for the backup's [`ACK`] (longer than the backup may take to
/// match the token; no answer at all means an older backup).
const ACK_TIMEOUT: Duration = Duration::from_secs(6);

type Token = [u8; 32];

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

/// Errors of opening a line (the primary's side).
#[derive(Debug, thiserror::Error)]
pub enum LivenessError {
    #[error("cannot connect to {addr} (tcp)")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr} (tcp) timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("{addr} refused the line: no session there claims our token")]
    Refused { addr: SocketAddr },
    /// The backup closed the line without answering our hello: its process is gone (a backup
    /// that refuses says so with [`NAK`]).
    #[error("{addr} closed the line before answering our hello: its process is gone")]
    ClosedUnanswered { addr: SocketAddr },
    #[error("{addr} answered {byte:#04x} to our hello, not the acknowledgement")]
    BadAnswer { addr: SocketAddr, byte: u8 },
}

/// The primary's side: connects to the backup at `addr` (the QUIC listen address, over TCP),
/// presents the session's token and waits for the backup to accept the line.
pub async fn connect(addr: SocketAddr, token: Token) -> Result<Line, LivenessError> {
    let connect = TcpStream::connect(addr);
    let mut stream = tokio::time::timeout(HELLO_TIMEOUT, connect)
        .await
        .map_err(|_| LivenessError::ConnectTimeout { addr, after: HELLO_TIMEOUT })?
        .map_err(|source| LivenessError::Connect { addr, source })?;
    let io = |source| LivenessError::Connect { addr, source };
    stream.set_nodelay(true).map_err(io)?;
    stream.write_all(&hello(MAGIC, &token)).await.map_err(io)?;
    let mut answer = [0u8; 1];
    match tokio::time::timeout(ACK_TIMEOUT, stream.read(&mut answer)).await {
        Ok(Ok(1)) if answer[0] == ACK => Ok(Line::spawn(stream)),
        Ok(Ok(1)) if answer[0] == NAK => Err(LivenessError::Refused { addr }),
        Ok(Ok(1)) => Err(LivenessError::BadAnswer { addr, byte: answer[0] }),
        Ok(Ok(_) | Err(_)) => Err(LivenessError::ClosedUnanswered { addr }),
        Err(_) => {
            tracing::info!(%addr, "liveness: no acknowledgement (an older backup): keeping the line unconfirmed");
            Ok(Line::spawn(stream))
        }
    }
}

fn hello(magic: &[u8; 8], token: &Token) -> [u8; 40] {
    let mut hello = [0u8; 40];
    hello[..8].copy_from_slice(magic);
    hello[8..].copy_from_slice(token);
    hello
}

/// The primary's side of `session`: holds its line to the backup at `addr` until the backup
/// ends it. Never resolves when there is no line (no token, no TCP path to the backup, the
/// backup refused it): then heartbeats alone decide.
/// The token is taken from `session` at once: the future does not keep the connection alive.
pub fn hold(addr: SocketAddr, session: &crate::Connection) -> impl std::future::Future<Output = End> + Send + 'static {
    let token = session.keying_material(LABEL);
    async move {
        let Some(token) = token else { return std::future::pending().await };
        hold_token(addr, token).await
    }
}

/// [`hold`] with the session's token.
async fn hold_token(addr: SocketAddr, token: Token) -> End {
    match connect(addr, token).await {
        Ok(mut line) => line.ended().await,
        // The backup died between our session and its line's answer: that is process death
        // too (taken for a refusal, it left detection to heartbeats alone).
        Err(e @ LivenessError::ClosedUnanswered { .. }) => End::Died(e.to_string()),
        Err(e) => {
            tracing::info!(%addr, "liveness: no line to the backup ({e}): detection by heartbeats only");
            std::future::pending().await
        }
    }
}

/// Sessions watching for their line, and the bounds on connections not yet claimed.
#[derive(Default)]
struct Table {
    /// Token -> the watching session's hand-over.
    watching: Vec<(Token, oneshot::Sender<TcpStream>)>,
    /// Unclaimed connections per IP address.
    pending: HashMap<IpAddr, usize>,
    pending_total: usize,
}

struct Shared {
    table: Mutex<Table>,
    /// A session started watching.
    watched: Notify,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The watching session's hand-over for `token`, removed from the table.
    fn claim(&self, token: &Token) -> Option<oneshot::Sender<TcpStream>> {
        let mut table = self.table();
        let i = table.watching.iter().position(|(t, _)| constant_time_eq(t, token))?;
        Some(table.watching.swap_remove(i).1)
    }
}

/// Releases a pending slot when a hello task ends.
struct PendingSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut table = self.shared.table();
        table.pending_total -= 1;
        if let Some(n) = table.pending.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                table.pending.remove(&self.ip);
            }
        }
    }
}

/// The backup's side: accepts lines and hands each to the session whose token it presents.
pub struct Listener {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    local: SocketAddr,
}

impl Listener {
    /// Listens on `addr` (TCP).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let shared = Arc::new(Shared { table: Mutex::default(), watched: Notify::new() });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self { shared, task, local })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Connections that have not shown a claimed token yet (at most [`MAX_PENDING`]).
    pub fn pending(&self) -> usize {
        self.shared.table().pending_total
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

    /// [`Listener::watch`] when there is a listener; without one a future that never resolves
    /// (heartbeats alone then decide).
    pub fn watch_if<'a>(
        lines: Option<&'a Listener>,
        session: &crate::Connection,
    ) -> impl std::future::Future<Output = End> + 'a {
        let watch = lines.map(|l| l.watch(session));
        async move {
            match watch {
                Some(w) => w.await,
                None => std::future::pending().await,
            }
        }
    }

    /// Waits for the line of the session whose token is `token` (one that arrived up to
    /// [`CLAIM_TIMEOUT`] before counts too). Cancel-safe: dropping the future withdraws the
    /// claim.
    pub async fn accept_for(&self, token: Token) -> Line {
        let (tx, rx) = oneshot::channel();
        self.shared.table().watching.push((token, tx));
        self.shared.watched.notify_waiters();
        let _withdraw = Withdraw { shared: &self.shared, token };
        match rx.await {
            Ok(stream) => Line::spawn(stream),
            // Only if the listener's table dropped our hand-over, which it never does.
            Err(_) => std::future::pending().await,
        }
    }
}

/// Removes a watching session's entry when its `accept_for` ends (claimed or cancelled).
struct Withdraw<'a> {
    shared: &'a Shared,
    token: Token,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        self.shared.table().watching.retain(|(t, _)| !constant_time_eq(t, &self.token));
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut refused: u64 = 0;
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let slot = {
            let mut table = shared.table();
            let from_ip = table.pending.get(&peer.ip()).copied().unwrap_or(0);
            if table.pending_total >= MAX_PENDING || from_ip >= MAX_PENDING_PER_ADDRESS {
                None
            } else {
                table.pending_total += 1;
                *table.pending.entry(peer.ip()).or_default() += 1;
                Some(PendingSlot { shared: Arc::clone(&shared), ip: peer.ip() })
            }
        };
        let Some(slot) = slot else {
            refused += 1;
            // Logged for the 1st, 2nd, 4th, 8th... refusal: a flood cannot flood the log.
            if refused.is_power_of_two() {
                tracing::warn!(%peer, refused, "liveness: refused a connection: too many unauthenticated ones");
            }
            // Said, not just closed: a primary refused here must not take it for our death.
            let _ = stream.try_write(&[NAK]);
            drop(stream);
            continue;
        };
        tokio::spawn(serve_hello(stream, peer, slot));
    }
}

/// Reads one hello and hands the connection to the session that claims its token, or closes it.
async fn serve_hello(mut stream: TcpStream, peer: SocketAddr, slot: PendingSlot) {
    let connected = Instant::now();
    let mut hello = [0u8; 40];
    let acknowledge = match read_hello(&mut stream, &mut hello, connected + HELLO_TIMEOUT).await {
        Hello::Current => true,
        Hello::V1 => false,
        // A reachability probe (the re-protector's, a load balancer's): nothing to warn about.
        Hello::Silent => {
            tracing::debug!(%peer, "liveness: a connection closed before sending anything");
            return;
        }
        Hello::Invalid => {
            tracing::warn!(%peer, "liveness: refused a connection without a valid hello");
            return;
        }
    };
    let token: Token = hello[8..].try_into().expect("32 bytes");
    // The primary may be quicker than its session's watcher: wait for the claim a while.
    let deadline = connected + CLAIM_TIMEOUT;
    let handover = loop {
        let watched = slot.shared.watched.notified();
        tokio::pin!(watched);
        watched.as_mut().enable();
        if let Some(handover) = slot.shared.claim(&token) {
            break handover;
        }
        if tokio::time::timeout_at(deadline, watched).await.is_err() {
            tracing::warn!(%peer, "liveness: refused a connection: no session claims its token");
            if acknowledge {
                let _ = stream.write_all(&[NAK]).await;
            }
            return;
        }
    };
    drop(slot);
    let _ = stream.set_nodelay(true);
    if acknowledge && stream.write_all(&[ACK]).await.is_err() {
        tracing::info!(%peer, "liveness: the line closed before it was acknowledged");
    }
    tracing::debug!(%peer, "liveness: line attached to its session");
    if let Err(stream) = handover.send(stream) {
        // The session stopped watching in the meantime: it is over, so say goodbye.
        drop(Line::spawn(stream));
    }
}

/// What a connection sent before its hello's deadline.
#[derive(Debug, PartialEq, Eq)]
enum Hello {
    /// A hello of this version (acknowledged).
    Current,
    /// A hello of the first version (not acknowledged).
    V1,
    /// Nothing: the peer closed the connection before sending a byte.
    Silent,
    /// Anything else: a wrong magic, a short hello, an error, or silence until the deadline.
    Invalid,
}

/// Reads a hello into `hello` until `deadline`.
async fn read_hello(stream: &mut TcpStream, hello: &mut [u8; 40], deadline: Instant) -> Hello {
    let mut got = 0;
    while got < hello.len() {
        match tokio::time::timeout_at(deadline, stream.read(&mut hello[got..])).await {
            Ok(Ok(0)) if got == 0 => return Hello::Silent,
            Ok(Ok(0) | Err(_)) | Err(_) => return Hello::Invalid,
            Ok(Ok(n)) => got += n,
        }
    }
    match &hello[..8] {
        m if m == MAGIC => Hello::Current,
        m if m == MAGIC_V1 => Hello::V1,
        _ => Hello::Invalid,
    }
}

fn constant_time_eq(a: &Token, b: &Token) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Token = [7; 32];

    async fn listener() -> (Listener, SocketAddr) {
        let l = Listener::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr();
        (l, addr)
    }

    async fn within<F: std::future::Future>(ms: u64, f: F) -> Option<F::Output> {
        tokio::time::timeout(Duration::from_millis(ms), f).await.ok()
    }

    /// A TCP connection from `ip` (another loopback address stands for another host).
    async fn connect_from(ip: &str, addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// Whether the other end closed `stream` (end of file or reset) within `ms`, after at
    /// most a refusal ([`NAK`]).
    async fn closed_within(stream: &mut TcpStream, ms: u64) -> bool {
        let mut buf = [0u8; 8];
        let deadline = Instant::now() + Duration::from_millis(ms);
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(n)) if buf[..n].iter().all(|&b| b == NAK) => continue,
                _ => return false,
            }
        }
    }

    #[tokio::test]
    async fn goodbye_is_not_death() {
        let (l, addr) = listener().await;
        let (primary, backup) = tokio::join!(connect(addr, T), l.accept_for(T));
        let mut backup = backup;
        drop(primary.unwrap());
        assert_eq!(within(2000, backup.ended()).await, Some(End::Bye));
    }

    #[tokio::test]
    async fn a_close_without_goodbye_is_death_both_ways() {
        let (l, addr) = listener().await;
        // The primary's process dies: its kernel closes the socket, nobody says goodbye.
        let mut raw = TcpStream::connect(addr).await.unwrap();
        raw.write_all(&hello(MAGIC, &T)).await.unwrap();
        let mut backup = within(2000, l.accept_for(T)).await.expect("line accepted");
        let mut ack = [0u8; 1];
        raw.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack[0], ACK);
        drop(raw);
        assert!(matches!(within(2000, backup.ended()).await, Some(End::Died(_))));

        // The backup's process dies under a primary's line it had acknowledged.
        let raw_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a2 = raw_listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let mut s = raw_listener.accept().await.unwrap().0;
            let mut hello = [0u8; 40];
            s.read_exact(&mut hello).await.unwrap();
            s.write_all(&[ACK]).await.unwrap();
            s
        });
        let mut primary = connect(a2, T).await.unwrap();
        drop(accept.await.unwrap());
        assert!(matches!(within(2000, primary.ended()).await, Some(End::Died(_))));
    }

    /// A backup whose process dies after the primary's hello but before its answer: the line
    /// ends as death (it used to read as a refusal, leaving detection to heartbeats: one of the
    /// backup kills that stalled ~900 ms).
    #[tokio::test]
    async fn a_backup_dying_before_its_answer_is_death() {
        let raw_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = raw_listener.local_addr().unwrap();
        let dies = tokio::spawn(async move {
            let mut s = raw_listener.accept().await.unwrap().0;
            let mut hello = [0u8; 40];
            s.read_exact(&mut hello).await.unwrap();
            drop(s);
        });
        let error = connect(addr, T).await.err().expect("no line");
        assert!(matches!(error, LivenessError::ClosedUnanswered { .. }), "{error}");
        dies.await.unwrap();

        // Through `hold`, as the primary's link uses it: resolves, as death.
        let raw_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = raw_listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut s = raw_listener.accept().await.unwrap().0;
            let mut hello = [0u8; 40];
            s.read_exact(&mut hello).await.unwrap();
        });
        let end = within(3000, hold_token(addr, T)).await;
        assert!(matches!(end, Some(End::Died(_))), "{end:?}");
    }

    #[tokio::test]
    async fn an_older_primary_is_still_served() {
        let (l, addr) = listener().await;
        let mut raw = TcpStream::connect(addr).await.unwrap();
        raw.write_all(&hello(MAGIC_V1, &T)).await.unwrap();
        let mut backup = within(2000, l.accept_for(T)).await.expect("line accepted");
        // No acknowledgement for a version 1 hello: the old primary would read it as garbage.
        let mut buf = [0u8; 1];
        assert!(within(300, raw.read(&mut buf)).await.is_none(), "nothing is written to an old primary");
        raw.write_all(&[BYE]).await.unwrap();
        assert_eq!(within(2000, backup.ended()).await, Some(End::Bye));
    }

    /// What `send` (then a close) on a fresh connection reads as, on the listening side.
    async fn hello_of(send: &[u8]) -> Hello {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        client.write_all(send).await.unwrap();
        drop(client);
        let mut hello = [0u8; 40];
        read_hello(&mut server, &mut hello, Instant::now() + Duration::from_secs(2)).await
    }

    /// A probe that connects and closes without a byte (the re-protector checking a standby
    /// is up) is `Silent` (logged at debug); garbage, a short hello or a wrong magic is
    /// `Invalid` (a warning); hellos of both versions are read whole.
    #[tokio::test]
    async fn a_silent_probe_is_not_an_invalid_hello() {
        assert_eq!(hello_of(&[]).await, Hello::Silent);
        assert_eq!(hello_of(&[0u8; 40]).await, Hello::Invalid);
        assert_eq!(hello_of(b"GET / HTTP/1.1\r\n\r\n").await, Hello::Invalid);
        assert_eq!(hello_of(&hello(MAGIC, &T)[..20]).await, Hello::Invalid);
        assert_eq!(hello_of(&hello(MAGIC, &T)).await, Hello::Current);
        assert_eq!(hello_of(&hello(MAGIC_V1, &T)).await, Hello::V1);
        // Connected and silent until the deadline: invalid (it held a pending slot).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 40];
        let silent = read_hello(&mut server, &mut buf, Instant::now() + Duration::from_millis(100)).await;
        assert_eq!(silent, Hello::Invalid);
    }

    #[tokio::test]
    async fn a_token_nobody_claims_is_refused_not_death() {
        let (l, addr) = listener().await;
        let started = Instant::now();
        let error = connect(addr, [8; 32]).await.err().expect("refused");
        assert!(matches!(error, LivenessError::Refused { .. }), "{error}");
        assert!(started.elapsed() < CLAIM_TIMEOUT + Duration::from_secs(1));
        assert_eq!(l.pending(), 0);
        // Garbage is closed at once.
        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage.write_all(&[0u8; 40]).await.unwrap();
        assert!(closed_within(&mut garbage, 1000).await);
    }

    /// Hellos with tokens nobody claims, however many, neither close nor take the place of the
    /// line of a session whose primary was quicker than its watcher.
    #[tokio::test]
    async fn unauthenticated_connections_cannot_close_or_take_a_line() {
        let (l, addr) = listener().await;
        // The primary's line arrives before the backup's session watches for it.
        let primary = tokio::spawn(connect(addr, T));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut bogus = Vec::new();
        for i in 0..40u8 {
            let ip = format!("127.0.1.{}", 1 + i % 8);
            let mut s = connect_from(&ip, addr).await;
            let _ = s.write_all(&hello(MAGIC, &[i; 32])).await;
            bogus.push(s);
        }
        let mut backup = within(2000, l.accept_for(T)).await.expect("the real line is claimed");
        let mut primary = primary.await.unwrap().expect("the real line is acknowledged");
        assert!(within(500, primary.ended()).await.is_none(), "the primary's line must stay open");
        assert!(within(100, backup.ended()).await.is_none(), "the backup's line must stay open");
        // Every bogus connection is closed by the claim timeout at the latest.
        for s in &mut bogus {
            assert!(closed_within(s, 6000).await, "a bogus connection was held");
        }
        assert_eq!(l.pending(), 0);
        assert!(within(200, primary.ended()).await.is_none(), "the primary's line must stay open");
    }

    #[tokio::test]
    async fn pending_connections_are_bounded() {
        let (l, addr) = listener().await;
        // Silent connections from one address: only a few are held, the rest closed at once.
        let mut one_host = Vec::new();
        for _ in 0..10 {
            one_host.push(connect_from("127.0.2.1", addr).await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(l.pending(), MAX_PENDING_PER_ADDRESS);
        let mut closed = 0;
        for s in &mut one_host {
            closed += usize::from(closed_within(s, 50).await);
        }
        assert_eq!(closed, 10 - MAX_PENDING_PER_ADDRESS, "the surplus is closed at once");
        // From many addresses: at most MAX_PENDING in all.
        let mut many = Vec::new();
        for i in 0..(2 * MAX_PENDING) {
            many.push(connect_from(&format!("127.0.3.{}", 1 + i % 100), addr).await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(l.pending(), MAX_PENDING);
        // While it is full a real line cannot get in; it is refused, which is not a death.
        assert!(matches!(connect(addr, T).await, Err(LivenessError::Refused { .. })));
        // They all time out (no hello), and then the real line gets in.
        tokio::time::sleep(HELLO_TIMEOUT + Duration::from_millis(300)).await;
        assert_eq!(l.pending(), 0);
        let (primary, backup) = tokio::join!(connect(addr, T), l.accept_for(T));
        let (mut primary, _backup) = (primary.unwrap(), backup);
        assert!(within(200, primary.ended()).await.is_none());
    }
}
