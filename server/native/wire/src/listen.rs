//! The listening sockets and their connections: binding (before any model loads, so a port in
//! use stops start-up at once), the connection cap, the request-head and handshake deadlines,
//! and a shutdown that serves every request already sent.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::call::LogLevel;
use crate::grpc::GrpcFront;
use crate::http::{HttpFront, Peer};
use crate::hub::Hub;

/// What the server is told at start (ServerConfig's network settings).
#[derive(Clone, Debug)]
pub struct Settings {
    pub host: String,
    pub http_port: u16,
    pub grpc_port: u16,
    /// --workers: share the ports with other processes (SO_REUSEPORT).
    pub reuse_port: bool,
    /// Open connections per protocol past which new ones are refused.
    pub max_connections: usize,
    /// A connection's request head (HTTP) or handshake (gRPC) must be complete within this.
    pub header_timeout: Duration,
    /// An idle HTTP keep-alive connection is closed after this.
    pub keep_alive_timeout: Duration,
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub http_max_body_bytes: usize,
    pub grpc_max_message_bytes: usize,
    pub threads: usize,
}

/// Seconds between two "connection limit reached" log lines; how long a refused HTTP
/// connection may read its 503 before it is closed, and how many may linger at once.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
const REFUSED_LINGER: Duration = Duration::from_secs(1);
const MAX_LINGERING: usize = 64;
/// The HTTP/2 client preface: a gRPC connection that has not sent it within the header
/// timeout is closed.
const H2_PREFACE_LEN: u64 = 24;

/// One protocol's listener and its connections.
struct Listener {
    kind: &'static str,
    /// The socket itself, for the SYN filter at shutdown; taken when the listener closes.
    socket: Mutex<Option<std::net::TcpListener>>,
    stop_accepting: Notify,
    stopped: AtomicBool,
    open: AtomicUsize,
    graceful: Mutex<Option<hyper_util::server::graceful::GracefulShutdown>>,
    refused: AtomicUsize,
    last_refusal_log: Mutex<Option<Instant>>,
    lingering: AtomicUsize,
}

/// The running native front end.
pub struct Server {
    runtime: Option<tokio::runtime::Runtime>,
    pub http_port: u16,
    pub grpc_port: u16,
    http: Arc<Listener>,
    grpc: Arc<Listener>,
}

fn bind(kind: &str, host: &str, port: u16, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let describe = |error: io::Error| io::Error::new(error.kind(), format!("{kind} could not bind {host}:{port}: {error}"));
    let address: SocketAddr = (host, port)
        .to_socket_addrs()
        .map_err(describe)?
        .next()
        .ok_or_else(|| describe(io::Error::new(io::ErrorKind::InvalidInput, "no address")))?;
    let domain = socket2::Domain::for_address(address);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP)).map_err(describe)?;
    socket.set_reuse_address(true).map_err(describe)?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(describe)?;
    }
    socket.bind(&address.into()).map_err(describe)?;
    socket.listen(2048).map_err(describe)?;
    socket.set_nonblocking(true).map_err(describe)?;
    Ok(socket.into())
}

/// Make a listening socket drop incoming SYNs (a classic BPF program, `ret #0`), so no new
/// connection joins its accept queue while the queued ones are accepted and answered; the
/// client's retried SYN then finds the port closed (refused, its request never sent).
fn drop_new_connections(socket: &std::net::TcpListener) -> io::Result<()> {
    let mut program = [libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0 }];
    let filter = libc::sock_fprog { len: 1, filter: program.as_mut_ptr() };
    // SAFETY: setsockopt reads the sock_fprog and the one instruction it points to, both alive
    // for the duration of the call; the kernel copies the program.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&filter as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Listener {
    fn new(kind: &'static str, socket: std::net::TcpListener) -> Arc<Self> {
        Arc::new(Listener {
            kind,
            socket: Mutex::new(Some(socket)),
            stop_accepting: Notify::new(),
            stopped: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            graceful: Mutex::new(Some(hyper_util::server::graceful::GracefulShutdown::new())),
            refused: AtomicUsize::new(0),
            last_refusal_log: Mutex::new(None),
            lingering: AtomicUsize::new(0),
        })
    }

    fn note_refused(&self, hub: &Hub, cap: usize) {
        let count = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let mut last = self.last_refusal_log.lock();
        if last.is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_INTERVAL) {
            *last = Some(now);
            hub.log(
                LogLevel::Warning,
                format!(
                    "{} connection limit reached ({cap} open): refusing new connections ({count} refused so far; --max-connections)",
                    self.kind
                ),
            );
        }
    }
}

impl Server {
    /// Bind both ports and start serving on `settings.threads` threads.
    /// `tls`: the (HTTP, gRPC) acceptors when both ports speak TLS.
    pub fn start(settings: Settings, hub: Arc<Hub>, tls: Option<(Arc<crate::tls::TlsAcceptor>, Arc<crate::tls::TlsAcceptor>)>) -> io::Result<Server> {
        let http_socket = bind("HTTP", &settings.host, settings.http_port, settings.reuse_port)?;
        let grpc_socket = bind("gRPC", &settings.host, settings.grpc_port, settings.reuse_port)?;
        let http_port = http_socket.local_addr()?.port();
        let grpc_port = grpc_socket.local_addr()?.port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.threads.max(1))
            .thread_name("convoy-wire")
            .enable_all()
            .build()?;
        let http = Listener::new("HTTP", http_socket.try_clone()?);
        let grpc = Listener::new("gRPC", grpc_socket.try_clone()?);
        let settings = Arc::new(settings);
        {
            let _entered = runtime.enter();
            let http_front = Arc::new(HttpFront { hub: hub.clone(), max_body_bytes: settings.http_max_body_bytes, tls: tls.is_some() });
            let grpc_front = Arc::new(GrpcFront { hub: hub.clone(), max_message_bytes: settings.grpc_max_message_bytes });
            let http_listener = TcpListener::from_std(http_socket)?;
            let grpc_listener = TcpListener::from_std(grpc_socket)?;
            let (http_tls, grpc_tls) = match tls {
                Some((http_tls, grpc_tls)) => (Some(http_tls), Some(grpc_tls)),
                None => (None, None),
            };
            runtime.spawn(accept_http(http_listener, http.clone(), http_front, settings.clone(), hub.clone(), http_tls));
            runtime.spawn(accept_grpc(grpc_listener, grpc.clone(), grpc_front, settings.clone(), hub.clone(), grpc_tls));
        }
        Ok(Server { runtime: Some(runtime), http_port, grpc_port, http, grpc })
    }

    /// Shutdown, first step: drop new SYNs on both ports (connections already queued are
    /// still accepted).
    pub fn filter_new_connections(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for listener in [&self.http, &self.grpc] {
            if let Some(socket) = listener.socket.lock().as_ref() {
                if let Err(error) = drop_new_connections(socket) {
                    problems.push(format!("cannot filter the {} listener: {error}", listener.kind));
                }
            }
        }
        problems
    }

    /// Shutdown, second step: stop accepting and close both listeners.
    pub fn close_listeners(&self) {
        for listener in [&self.http, &self.grpc] {
            listener.stopped.store(true, Ordering::SeqCst);
            listener.stop_accepting.notify_one();
            listener.socket.lock().take();
        }
    }

    /// Shutdown, third step: every open connection finishes what it has begun and closes
    /// (idle HTTP connections at once, HTTP/2 after GOAWAY once its streams are done).
    pub fn shutdown_connections(&self) {
        let runtime = self.runtime.as_ref().expect("running");
        for listener in [&self.http, &self.grpc] {
            if let Some(graceful) = listener.graceful.lock().take() {
                runtime.spawn(graceful.shutdown());
            }
        }
    }

    /// Open (HTTP, gRPC) connections.
    pub fn open_connections(&self) -> (usize, usize) {
        (self.http.open.load(Ordering::SeqCst), self.grpc.open.load(Ordering::SeqCst))
    }

    /// Stop everything now (after the graceful steps, or on a failed start).
    pub fn stop(&mut self) {
        self.close_listeners();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_millis(500));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accept until told to stop; a failing accept (e.g. out of file descriptors) is logged and
/// retried shortly, never fatal.
async fn accept_loop<F>(listener: TcpListener, state: Arc<Listener>, hub: Arc<Hub>, mut serve: F)
where
    F: FnMut(TcpStream, SocketAddr),
{
    loop {
        if state.stopped.load(Ordering::SeqCst) {
            return;
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = state.stop_accepting.notified() => return,
        };
        match accepted {
            Ok((stream, client)) => {
                let _ = stream.set_nodelay(true);
                serve(stream, client);
            }
            Err(error) => {
                hub.log(LogLevel::Warning, format!("{} accept failed: {error}", state.kind));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Counts a connection while it lives.
struct OpenConnection(Arc<Listener>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn admit(state: &Arc<Listener>, hub: &Hub, cap: usize) -> Option<OpenConnection> {
    if state.open.fetch_add(1, Ordering::SeqCst) >= cap {
        state.open.fetch_sub(1, Ordering::SeqCst);
        state.note_refused(hub, cap);
        return None;
    }
    Some(OpenConnection(state.clone()))
}

const TOO_MANY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 46\r\nconnection: close\r\n\r\n{\"error\":\"too many connections; retry later\"}";

async fn accept_http(
    listener: TcpListener,
    state: Arc<Listener>,
    front: Arc<HttpFront>,
    settings: Arc<Settings>,
    hub: Arc<Hub>,
    tls: Option<Arc<crate::tls::TlsAcceptor>>,
) {
    let server = listener.local_addr().expect("a bound listener");
    let accept_state = state.clone();
    accept_loop(listener, accept_state, hub.clone(), move |stream, client| {
        let Some(open) = admit(&state, &hub, settings.max_connections) else {
            // Answered 503 at once; half-closed so the client can read it before the close.
            if state.lingering.fetch_add(1, Ordering::SeqCst) < MAX_LINGERING {
                let state = state.clone();
                tokio::spawn(async move {
                    let mut stream = stream;
                    let _ = stream.write_all(TOO_MANY).await;
                    let _ = stream.shutdown().await;
                    tokio::time::sleep(REFUSED_LINGER).await;
                    state.lingering.fetch_sub(1, Ordering::SeqCst);
                });
            } else {
                state.lingering.fetch_sub(1, Ordering::SeqCst);
            }
            return;
        };
        let Some(watcher) = state.graceful.lock().as_ref().map(|g| g.watcher()) else { return };
        let front = front.clone();
        let settings = settings.clone();
        let tls = tls.clone();
        let hub = hub.clone();
        tokio::spawn(async move {
            let _open = open;
            let clock = Clock::new(settings.header_timeout, Some(settings.keep_alive_timeout));
            let peer = Peer { client: Some(client), server };
            let io = TimedIo { inner: stream, clock: clock.clone() };
            match tls {
                None => serve_http1(io, clock, front, peer, &settings, watcher).await,
                Some(acceptor) => match crate::tls::accept(&acceptor, io, settings.header_timeout).await {
                    Ok(io) => serve_http1(io, clock, front, peer, &settings, watcher).await,
                    Err(error) => hub.log(LogLevel::Debug, format!("HTTP TLS handshake failed: {error}")),
                },
            }
        });
    })
    .await
}

async fn serve_http1<I>(
    io: I,
    clock: Arc<Clock>,
    front: Arc<HttpFront>,
    peer: Peer,
    settings: &Settings,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service_clock = clock.clone();
    let service = hyper::service::service_fn(move |request| {
        let front = front.clone();
        let clock = service_clock.clone();
        clock.request_started();
        async move {
            let response = front.serve(peer, request).await;
            response.map(|response| response.map(|body| Tracked { body, _busy: BusyGuard(clock) }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true)
        .max_buf_size(settings.max_head_bytes.max(8192) + 8192)
        .max_header_size(settings.max_head_bytes)
        .max_headers(settings.max_headers);
    let connection = watcher.watch(builder.serve_connection(hyper_util::rt::TokioIo::new(io), service));
    tokio::select! {
        _ = connection => {}
        _ = clock.expired() => {}
    }
}

async fn accept_grpc(
    listener: TcpListener,
    state: Arc<Listener>,
    front: Arc<GrpcFront>,
    settings: Arc<Settings>,
    hub: Arc<Hub>,
    tls: Option<Arc<crate::tls::TlsAcceptor>>,
) {
    let accept_state = state.clone();
    accept_loop(listener, accept_state, hub.clone(), move |stream, _client| {
        let Some(open) = admit(&state, &hub, settings.max_connections) else {
            drop(stream); // gRPC's own servers close past their cap too
            return;
        };
        let Some(watcher) = state.graceful.lock().as_ref().map(|g| g.watcher()) else { return };
        let front = front.clone();
        let settings = settings.clone();
        let tls = tls.clone();
        let hub = hub.clone();
        tokio::spawn(async move {
            let _open = open;
            let clock = Clock::new(settings.header_timeout, None);
            let io = TimedIo { inner: stream, clock: clock.clone() };
            match tls {
                None => serve_h2(io, clock, front, watcher).await,
                Some(acceptor) => match crate::tls::accept(&acceptor, io, settings.header_timeout).await {
                    Ok(io) => serve_h2(io, clock, front, watcher).await,
                    Err(error) => hub.log(LogLevel::Debug, format!("gRPC TLS handshake failed: {error}")),
                },
            }
        });
    })
    .await
}

async fn serve_h2<I>(io: I, clock: Arc<Clock>, front: Arc<GrpcFront>, watcher: hyper_util::server::graceful::Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| front.clone().serve(request));
    let mut builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(1 << 22)
        .max_concurrent_streams(4096)
        .max_pending_accept_reset_streams(256);
    let connection = watcher.watch(builder.serve_connection(hyper_util::rt::TokioIo::new(io), service));
    tokio::select! {
        _ = connection => {}
        _ = clock.expired() => {}
    }
}

/// A connection's deadlines: its request head must be complete `header_timeout` after the
/// connection opened or after the first byte of a later request; an idle keep-alive connection
/// closes after `keep_alive` (HTTP). For HTTP/2 only the handshake (the preface) is timed.
pub struct Clock {
    header_timeout: Duration,
    keep_alive: Option<Duration>,
    state: Mutex<ClockState>,
    changed: Notify,
}

struct ClockState {
    head_deadline: Option<Instant>,
    idle_deadline: Option<Instant>,
    busy: usize,
    bytes: u64,
}

impl Clock {
    fn new(header_timeout: Duration, keep_alive: Option<Duration>) -> Arc<Clock> {
        Arc::new(Clock {
            header_timeout,
            keep_alive,
            state: Mutex::new(ClockState { head_deadline: Some(Instant::now() + header_timeout), idle_deadline: None, busy: 0, bytes: 0 }),
            changed: Notify::new(),
        })
    }

    fn read(&self, count: usize) {
        let mut state = self.state.lock();
        state.bytes += count as u64;
        if self.keep_alive.is_none() {
            if state.bytes >= H2_PREFACE_LEN && state.head_deadline.is_some() {
                state.head_deadline = None;
                self.changed.notify_one();
            }
            return;
        }
        if state.busy == 0 && state.head_deadline.is_none() {
            state.head_deadline = Some(Instant::now() + self.header_timeout);
            state.idle_deadline = None;
            self.changed.notify_one();
        }
    }

    fn request_started(&self) {
        let mut state = self.state.lock();
        state.busy += 1;
        state.head_deadline = None;
        state.idle_deadline = None;
        self.changed.notify_one();
    }

    fn request_finished(&self) {
        let mut state = self.state.lock();
        state.busy = state.busy.saturating_sub(1);
        if state.busy == 0 {
            state.idle_deadline = self.keep_alive.map(|idle| Instant::now() + idle);
            self.changed.notify_one();
        }
    }

    /// Resolves when a deadline passes.
    async fn expired(&self) {
        loop {
            let next = {
                let state = self.state.lock();
                match (state.head_deadline, state.idle_deadline) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            match next {
                Some(at) if at <= Instant::now() => return,
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }
}

/// Marks a request finished when its response body has been written (and dropped).
pub struct BusyGuard(Arc<Clock>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// A connection's socket, telling its clock when bytes arrive.
pub struct TimedIo<I> {
    inner: I,
    clock: Arc<Clock>,
}

impl<I: AsyncRead + Unpin> AsyncRead for TimedIo<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.clock.read(read);
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for TimedIo<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// An HTTP response body that marks its request finished once written.
pub struct Tracked {
    body: crate::http::Body,
    _busy: BusyGuard,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.body)
    }
}
