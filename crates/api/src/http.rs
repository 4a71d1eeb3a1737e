//! HTTP/1.1 framing for the API socket: reads each request with limits (head size, header
//! count, body size, time to deliver), answers framing errors itself with Firecracker's
//! `{"fault_message": ...}` body, and hands well-formed requests to the router.
//!
//! Why not a general HTTP server: one answers a bad request line, a negative or huge
//! `Content-Length`, or too many headers with an empty 400 (or waits for a body that never
//! comes), and a client of this API must always learn what it did wrong. Parsing is
//! `httparse`'s; routing and handlers stay axum's. Every framing refusal is a 400, as every
//! refused request is (Firecracker's convention), except a request that stops arriving: 408.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tower::ServiceExt;

use crate::server::BODY_LIMIT;

/// Longest request head (request line and headers).
pub const HEAD_LIMIT: usize = 16 * 1024;
/// Most headers in a request.
pub const MAX_HEADERS: usize = 32;
/// Longest request path.
pub const PATH_LIMIT: usize = 1024;
/// Time a client has to finish a request it started (head and body).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A request the framing layer refuses: a status and why.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

/// One parsed request, and whether the connection stays open after it.
struct Parsed {
    request: Request<Body>,
    keep_alive: bool,
}

/// Where the head ends (the index after the blank line), if it is complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses a complete head; returns the request (without its body), the body's length and
/// whether to keep the connection open.
fn parse_head(head: &[u8]) -> Result<(axum::http::request::Builder, usize, bool), Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(refuse(StatusCode::BAD_REQUEST, "incomplete request head"));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("too many headers (at most {MAX_HEADERS})"),
            ));
        }
        Err(e) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("malformed request: {e}"),
            ));
        }
    }
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(refuse(StatusCode::BAD_REQUEST, "malformed request line"));
    };
    if path.len() > PATH_LIMIT {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "the path is {} bytes long (at most {PATH_LIMIT})",
                path.len()
            ),
        ));
    }
    let mut length: Option<usize> = None;
    let mut keep_alive = minor == 1;
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .version(if minor == 1 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        });
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        match name.as_str() {
            "content-length" => {
                let text = std::str::from_utf8(h.value).unwrap_or("").trim();
                // Digits only: "-1", "+5" and "0x10" are refused, as is a value past usize.
                let n = text
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| text.parse::<u64>().ok())
                    .flatten()
                    .filter(|_| !text.is_empty())
                    .ok_or_else(|| {
                        refuse(
                            StatusCode::BAD_REQUEST,
                            format!("invalid Content-Length {text:?}"),
                        )
                    })?;
                if n > BODY_LIMIT as u64 {
                    return Err(refuse(
                        StatusCode::BAD_REQUEST,
                        format!("the body is {n} bytes long (at most {BODY_LIMIT})"),
                    ));
                }
                if length.is_some_and(|l| l as u64 != n) {
                    return Err(refuse(
                        StatusCode::BAD_REQUEST,
                        "conflicting Content-Length headers",
                    ));
                }
                length = Some(n as usize);
            }
            "transfer-encoding" => {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    "Transfer-Encoding is not supported: send Content-Length",
                ));
            }
            "connection" => {
                let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                if v.contains("close") {
                    keep_alive = false;
                } else if v.contains("keep-alive") {
                    keep_alive = true;
                }
            }
            _ => {}
        }
        builder = builder.header(h.name, h.value);
    }
    Ok((builder, length.unwrap_or(0), keep_alive))
}

/// Reads the next request from `stream` into `buf` (which may already hold bytes of it).
/// Ok(None): the client closed the connection between requests.
async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Option<Parsed>, Refusal> {
    // Waiting for a request to begin has no limit (an idle keep-alive connection); once it
    // has begun, it must arrive within the timeout.
    if buf.is_empty() {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    let head_len = loop {
        if let Some(end) = head_end(buf) {
            break end;
        }
        if buf.len() > HEAD_LIMIT {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("the request head is longer than {HEAD_LIMIT} bytes"),
            ));
        }
        read_more(stream, buf, deadline, "the request head").await?;
    };
    if head_len > HEAD_LIMIT {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("the request head is longer than {HEAD_LIMIT} bytes"),
        ));
    }
    let (builder, body_len, keep_alive) = parse_head(&buf[..head_len])?;
    while buf.len() < head_len + body_len {
        read_more(stream, buf, deadline, "the request body").await?;
    }
    let body: Vec<u8> = buf[head_len..head_len + body_len].to_vec();
    buf.drain(..head_len + body_len);
    let request = builder
        .body(Body::from(body))
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("malformed request: {e}")))?;
    Ok(Some(Parsed {
        request,
        keep_alive,
    }))
}

async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    deadline: tokio::time::Instant,
    what: &str,
) -> Result<(), Refusal> {
    let mut chunk = [0u8; 4096];
    match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
        Err(_) => Err(refuse(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "{what} did not arrive within {} s",
                REQUEST_TIMEOUT.as_secs()
            ),
        )),
        Ok(Ok(0)) => Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("the connection closed before {what} was complete"),
        )),
        Ok(Err(e)) => Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("cannot read {what}: {e}"),
        )),
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
    }
}

async fn write_response<S: AsyncWrite + Unpin>(
    stream: &mut S,
    response: Response<Body>,
    keep_alive: bool,
) -> std::io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            tracing::error!("cannot produce a response body: {e}");
            Default::default()
        }
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in &parts.headers {
        if name == "content-length" || name == "connection" {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let no_body = parts.status == StatusCode::NO_CONTENT;
    if !no_body {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !no_body {
        out.extend_from_slice(&body);
    }
    stream.write_all(&out).await?;
    stream.flush().await
}

fn refusal_response(r: Refusal) -> Response<Body> {
    let body = serde_json::json!({ "fault_message": r.message }).to_string();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = r.status;
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Serves one connection until the client closes it, asks to, or sends something that
/// cannot be framed (answered, then closed: the stream's framing is lost).
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    app: Router,
    mut draining: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf = Vec::new();
    loop {
        // Between requests, a server that is shutting down closes the connection; a request
        // already begun is answered first.
        let next = if buf.is_empty() {
            tokio::select! {
                r = read_request(&mut stream, &mut buf) => r,
                _ = draining.wait_for(|d| *d) => return,
            }
        } else {
            read_request(&mut stream, &mut buf).await
        };
        match next {
            Ok(None) => return,
            Ok(Some(Parsed {
                request,
                keep_alive,
            })) => {
                let response = match app.clone().oneshot(request).await {
                    Ok(r) => r,
                    Err(e) => match e {},
                };
                if write_response(&mut stream, response, keep_alive)
                    .await
                    .is_err()
                    || !keep_alive
                {
                    return;
                }
            }
            Err(r) => {
                tracing::debug!(status = %r.status, "refused request: {}", r.message);
                let _ = write_response(&mut stream, refusal_response(r), false).await;
                return;
            }
        }
    }
}

/// How long a shutting-down server waits for requests in progress to be answered.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts connections on `listener` and serves each on its own task until `shutdown`
/// resolves; then answers the requests in progress (for up to [`DRAIN_TIMEOUT`]) and closes
/// every connection, so a client whose request ended the VMM (`SendCtrlAltDel`) still gets
/// its answer.
pub async fn serve(
    listener: tokio::net::UnixListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    let (drain, draining) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, _)) => {
                        tasks.spawn(serve_connection(stream, app.clone(), draining.clone()));
                    }
                    Err(e) => break Err(e),
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    };
    drop(listener);
    let _ = drain.send(true);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(head: &[u8]) -> Refusal {
        match parse_head(head) {
            Err(r) => r,
            Ok(_) => panic!("accepted {}", String::from_utf8_lossy(head)),
        }
    }

    #[test]
    fn content_length_must_be_a_small_decimal() {
        for cl in ["-1", "+5", "0x10", "", "1 2", "18446744073709551616"] {
            let head = format!("PUT /x HTTP/1.1\r\nContent-Length: {cl}\r\n\r\n");
            let r = refused(head.as_bytes());
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{cl:?}");
            assert!(r.message.contains("Content-Length"), "{}", r.message);
        }
        let r = refused(b"PUT /x HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n");
        assert!(r.message.contains("at most"), "{}", r.message);
        let r = refused(b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
        assert!(r.message.contains("conflicting"));
        let (_, n, keep) = parse_head(b"PUT /x HTTP/1.1\r\nContent-Length: 12\r\n\r\n")
            .map_err(|r| r.message)
            .unwrap();
        assert_eq!((n, keep), (12, true));
    }

    #[test]
    fn bad_heads_are_refused_with_a_reason() {
        assert!(
            refused(b"GARBAGE\r\n\r\n")
                .message
                .contains("malformed request")
        );
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEADERS + 1 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(refused(&many).message.contains("too many headers"));
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(PATH_LIMIT + 1));
        assert!(refused(long.as_bytes()).message.contains("path"));
        let chunked = b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(refused(chunked).message.contains("Transfer-Encoding"));
        let (_, _, keep) = parse_head(b"GET / HTTP/1.0\r\n\r\n")
            .map_err(|r| r.message)
            .unwrap();
        assert!(!keep);
    }
}
