//! The HTTP/1.1 front end on hyper. `POST /v2/models/{m}[/versions/{v}]/infer` to a model the
//! table vouches for is read, inflated, parsed, checked and answered here; every other request
//! (and every infer request the native path leaves alone) is forwarded whole to the Python ASGI
//! app, whose answer is written back as it comes (server-sent events included).

use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use crate::call::{Answer, Failure, HttpForward, Item, LogLevel};
use crate::errors::{guard_async, Kind, INTERNAL_MESSAGE};
use crate::http_infer::{self, HttpEnvelope};
use crate::hub::{monotonic_ns, Hub, SlotGuard};
use crate::model::ModelSpec;

/// Answers of at least this many bytes are compressed when the client accepts it (as the
/// Python handler does).
const COMPRESS_FROM: usize = 1024;

pub struct HttpFront {
    pub hub: Arc<Hub>,
    /// --http-max-body-bytes.
    pub max_body_bytes: usize,
    pub tls: bool,
}

/// Who is on the other end of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub client: Option<SocketAddr>,
    pub server: SocketAddr,
}

/// A response body: whole, or parts as the Python app sends them.
pub enum Body {
    Full(Option<Bytes>),
    Parts { first: Option<Bytes>, receiver: mpsc::UnboundedReceiver<(u64, Answer)>, guard: SlotGuard, done: bool },
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Parts { first, receiver, guard, done } => loop {
                if let Some(chunk) = first.take() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                if *done {
                    return Poll::Ready(None);
                }
                match std::task::ready!(receiver.poll_recv(cx)) {
                    Some((_, Answer::HttpBody { chunk, more })) => {
                        if !more {
                            *done = true;
                            guard.disarm();
                        }
                        if chunk.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(chunk))));
                    }
                    Some(_) => continue,
                    None => {
                        *done = true;
                        return Poll::Ready(None);
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Body::Full(Some(data)) => http_body::SizeHint::with_exact(data.len() as u64),
            Body::Full(None) => http_body::SizeHint::with_exact(0),
            Body::Parts { .. } => http_body::SizeHint::default(),
        }
    }
}

fn full(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Body::Full(Some(body.into())));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The JSON error answer, with what goes with its status (as send_error in
/// server/http_api/handlers.py).
pub fn error_response(failure: &Failure, closing: bool) -> Response<Body> {
    let mut body = b"{\"error\":".to_vec();
    http_infer::write_string(&mut body, &failure.message);
    body.push(b'}');
    let mut response = full(failure.http_status, "application/json", body);
    let headers = response.headers_mut();
    match failure.http_status {
        429 => {
            let seconds = failure.retry_after_ms.unwrap_or(1000).div_ceil(1000).max(1);
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        401 => {
            headers.insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        _ => {}
    }
    if closing {
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

enum ReadError {
    TooLarge,
    /// The client went away or sent a broken body.
    Broken,
}

/// The whole request body, refused as soon as it passes `limit`.
async fn read_body(mut body: hyper::body::Incoming, limit: usize) -> Result<Bytes, ReadError> {
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    let mut size = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ReadError::Broken)?;
        let Ok(chunk) = frame.into_data() else { continue };
        if chunk.is_empty() {
            continue;
        }
        size += chunk.len();
        if size > limit {
            return Err(ReadError::TooLarge);
        }
        match (&mut first, &mut rest) {
            (None, None) => first = Some(chunk),
            (Some(head), None) => {
                let mut joined = BytesMut::with_capacity(size.max(head.len() * 2));
                joined.extend_from_slice(head);
                joined.extend_from_slice(&chunk);
                first = None;
                rest = Some(joined);
            }
            (_, Some(joined)) => joined.extend_from_slice(&chunk),
        }
    }
    Ok(match (first, rest) {
        (_, Some(joined)) => joined.freeze(),
        (Some(one), None) => one,
        (None, None) => Bytes::new(),
    })
}

enum Inflated {
    Body(Bytes),
    TooLarge,
    /// Not valid data of the encoding (or an encoding the native path does not inflate): the
    /// Python handler words the refusal.
    Unreadable,
}

/// A gzip (every member) or deflate (zlib) body inflated no further than `limit`.
fn inflate(body: &[u8], encoding: &[u8], limit: usize) -> Inflated {
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit.saturating_add(1)));
    let reader: Box<dyn Read> = match encoding {
        b"gzip" => Box::new(flate2::read::MultiGzDecoder::new(body)),
        b"deflate" => Box::new(flate2::read::ZlibDecoder::new(body)),
        _ => return Inflated::Unreadable,
    };
    match reader.take(limit as u64 + 1).read_to_end(&mut out) {
        Ok(_) if out.len() > limit => Inflated::TooLarge,
        Ok(_) => Inflated::Body(Bytes::from(out)),
        Err(_) => Inflated::Unreadable,
    }
}

fn compress(body: &[u8], accept: &[u8]) -> Option<(Vec<u8>, &'static str)> {
    use std::io::Write;
    let contains = |word: &[u8]| accept.windows(word.len()).any(|w| w == word);
    if contains(b"gzip") {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1));
        encoder.write_all(body).ok()?;
        return encoder.finish().ok().map(|b| (b, "gzip"));
    }
    if contains(b"deflate") {
        let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(1));
        encoder.write_all(body).ok()?;
        return encoder.finish().ok().map(|b| (b, "deflate"));
    }
    None
}

/// (model, version) when the path is an infer route.
fn infer_route(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/v2/models/")?;
    let mut parts = rest.split('/');
    let model = parts.next()?;
    match (parts.next()?, parts.next(), parts.next(), parts.next()) {
        ("infer", None, ..) => Some((model, "")),
        ("versions", Some(version), Some("infer"), None) if !version.is_empty() => Some((model, version)),
        _ => None,
    }
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers.get(name).map(HeaderValue::as_bytes)
}

impl HttpFront {
    /// Serve one request of a connection.
    pub async fn serve(self: Arc<Self>, peer: Peer, request: Request<hyper::body::Incoming>) -> Result<Response<Body>, Infallible> {
        let hub = self.hub.clone();
        let response = guard_async(hub.clone(), self.route(peer, request), |_| {
            error_response(&Kind::Internal.failure(INTERNAL_MESSAGE), false)
        })
        .await;
        let mut response = response;
        if !hub.accepting() {
            // Shutting down: the client sends its next request on a new connection, which
            // finds the listener gone.
            response.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(response)
    }

    async fn route(self: Arc<Self>, peer: Peer, request: Request<hyper::body::Incoming>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        if parts.method == Method::POST {
            if let Some((model, version)) = infer_route(parts.uri.path()) {
                let table = self.hub.models();
                if let Some(spec) = table.native(model) {
                    let spec = spec.clone();
                    let version = version.to_owned();
                    return self.infer(peer, parts, body, &spec, version).await;
                }
            }
        }
        match read_body(body, self.max_body_bytes).await {
            Ok(bytes) => self.forward(peer, parts, bytes).await,
            Err(error) => self.unreadable(error, self.max_body_bytes, "the server's limit", false),
        }
    }

    fn unreadable(&self, error: ReadError, limit: usize, why: &str, inflated: bool) -> Response<Body> {
        match error {
            ReadError::TooLarge => {
                let what = if inflated { "decompressed request body" } else { "request body" };
                error_response(&Kind::InvalidInput.failure(format!("{what} exceeds {limit} bytes ({why})")), false)
            }
            ReadError::Broken => error_response(&Kind::InvalidInput.failure("the request body could not be read"), false),
        }
    }

    async fn infer(
        self: Arc<Self>,
        peer: Peer,
        parts: http::request::Parts,
        body: hyper::body::Incoming,
        spec: &ModelSpec,
        version: String,
    ) -> Response<Body> {
        let received_ns = monotonic_ns();
        let headers = &parts.headers;
        let encoding = header(headers, "content-encoding").map(<[u8]>::to_ascii_lowercase);
        // What the model's declared inputs can need bounds the body before it is parsed.
        let (limit, why) = match encoding {
            Some(_) => (self.max_body_bytes, "the server's limit"),
            None => (spec.body_limit, spec.limit_reason.as_str()),
        };
        let raw = match read_body(body, limit).await {
            Ok(raw) => raw,
            Err(error) => return self.unreadable(error, limit, why, false),
        };
        let decoded = match &encoding {
            None => Some(raw.clone()),
            Some(name) => match inflate(&raw, name, spec.body_limit) {
                Inflated::Body(body) => Some(body),
                Inflated::TooLarge => {
                    return self.unreadable(ReadError::TooLarge, spec.body_limit, &spec.limit_reason, true);
                }
                Inflated::Unreadable => None,
            },
        };
        let json_length = match header(headers, "inference-header-content-length") {
            None => Some(None),
            Some(value) => std::str::from_utf8(value).ok().and_then(|v| v.parse::<usize>().ok()).map(Some),
        };
        let slot = self.hub.new_slot();
        let native = match (decoded, json_length) {
            (Some(body), Some(json_length)) => {
                let envelope = HttpEnvelope {
                    slot,
                    version,
                    received_ns,
                    authorization: header(headers, "authorization").and_then(|v| std::str::from_utf8(v).ok()).map(str::to_owned),
                    traceparent: header(headers, "traceparent").and_then(|v| std::str::from_utf8(v).ok()).map(str::to_owned),
                    split_key: (!spec.split_header.is_empty())
                        .then(|| header(headers, &spec.split_header))
                        .flatten()
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .map(str::to_owned),
                };
                http_infer::decode(spec, &body, json_length, envelope)
            }
            _ => None,
        };
        let Some((call, plan)) = native else {
            return self.forward_at(slot, peer, parts, raw).await;
        };
        let accept = header(headers, "accept-encoding").map(<[u8]>::to_ascii_lowercase);
        let receiver = self.hub.register_once_at(slot);
        let mut guard = SlotGuard::new(&self.hub, slot);
        self.hub.submit(Item::Infer(call));
        let answer = receiver.await;
        guard.disarm();
        match answer {
            Ok(Answer::Outputs { version, outputs, parameters }) => {
                let (body, split) = http_infer::encode_response(&plan, &version, &outputs, &parameters);
                let content_type = if split.is_some() { "application/octet-stream" } else { "application/json" };
                let mut encoded = None;
                if let Some(accept) = &accept {
                    if body.len() > COMPRESS_FROM {
                        encoded = compress(&body, accept);
                    }
                }
                let (body, encoding) = match encoded {
                    Some((compressed, name)) => (compressed, Some(name)),
                    None => (body, None),
                };
                let mut response = full(200, content_type, body);
                let headers = response.headers_mut();
                if let Some(split) = split {
                    headers.insert("inference-header-content-length", HeaderValue::from(split));
                }
                if let Some(name) = encoding {
                    headers.insert(http::header::CONTENT_ENCODING, HeaderValue::from_static(name));
                }
                response
            }
            Ok(Answer::Failed(failure)) => error_response(&failure, !self.hub.accepting()),
            Ok(other) => {
                self.hub.log(LogLevel::Error, format!("HTTP infer answered with {other:?}"));
                error_response(&Kind::Internal.failure(INTERNAL_MESSAGE), false)
            }
            Err(_) => error_response(&Kind::Unavailable.failure("server is shutting down"), true),
        }
    }

    async fn forward(self: Arc<Self>, peer: Peer, parts: http::request::Parts, body: Bytes) -> Response<Body> {
        let slot = self.hub.new_slot();
        self.forward_at(slot, peer, parts, body).await
    }

    /// The Python ASGI app answers: its response head (and whole body, or the first part),
    /// then any further parts through the response body.
    async fn forward_at(self: Arc<Self>, slot: u64, peer: Peer, parts: http::request::Parts, body: Bytes) -> Response<Body> {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        self.hub.register_many_at(slot, &sender);
        drop(sender);
        let mut guard = SlotGuard::new(&self.hub, slot);
        let target = parts.uri.path_and_query();
        let raw_path = Bytes::copy_from_slice(parts.uri.path().as_bytes());
        let query = target.and_then(|t| t.query()).map(|q| Bytes::copy_from_slice(q.as_bytes())).unwrap_or_default();
        let headers = parts
            .headers
            .iter()
            .map(|(name, value)| (Bytes::copy_from_slice(name.as_str().as_bytes()), Bytes::copy_from_slice(value.as_bytes())))
            .collect();
        self.hub.submit(Item::Http(HttpForward {
            slot,
            method: parts.method.as_str().to_owned(),
            raw_path,
            query,
            headers,
            body,
            client: peer.client,
            server: peer.server,
            tls: self.tls,
        }));
        loop {
            match receiver.recv().await {
                Some((_, Answer::HttpHead { status, headers, body, more })) => {
                    let mut response = if more {
                        // The first part rides with the head.
                        let first = (!body.is_empty()).then_some(body);
                        Response::new(Body::Parts { first, receiver, guard, done: false })
                    } else {
                        guard.disarm();
                        Response::new(Body::Full(Some(body)))
                    };
                    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    let map = response.headers_mut();
                    for (name, value) in headers {
                        // hyper writes the length of a whole body itself.
                        if !more && name.eq_ignore_ascii_case(b"content-length") {
                            continue;
                        }
                        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(&name), HeaderValue::from_bytes(&value)) {
                            map.append(name, value);
                        }
                    }
                    return response;
                }
                Some((_, Answer::Failed(failure))) => {
                    guard.disarm();
                    return error_response(&failure, !self.hub.accepting());
                }
                Some(_) => continue,
                None => {
                    guard.disarm();
                    return error_response(&Kind::Unavailable.failure("server is shutting down"), true);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infer_routes_are_recognised_and_nothing_else() {
        assert_eq!(infer_route("/v2/models/add_sub/infer"), Some(("add_sub", "")));
        assert_eq!(infer_route("/v2/models/add_sub/versions/3/infer"), Some(("add_sub", "3")));
        for path in ["/v2/models/add_sub", "/v2/models/add_sub/infer/x", "/v2/models/add_sub/versions//infer", "/v2/models/a/ready", "/v2/health/live"] {
            assert_eq!(infer_route(path), None, "{path}");
        }
    }

    #[test]
    fn bodies_inflate_within_their_limit() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&[b'x'; 1000]).unwrap();
        let mut two = gz.finish().unwrap();
        two.extend(two.clone()); // two gzip members
        assert!(matches!(inflate(&two, b"gzip", 2000), Inflated::Body(b) if b.len() == 2000));
        assert!(matches!(inflate(&two, b"gzip", 1999), Inflated::TooLarge));
        assert!(matches!(inflate(b"not gzip", b"gzip", 10), Inflated::Unreadable));
        assert!(matches!(inflate(b"x", b"br", 10), Inflated::Unreadable));
    }
}
