//! A minimal HTTP/1.1 client for the CLI commands that talk to a running Rebound's API socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// Sends one request; returns the response body, or an error carrying the API's
/// `fault_message`.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<String> {
    call_within(sock, method, path, body, None)
}

/// [`call`], failing if the VMM does not answer within `timeout` (a stopped or hung VMM must
/// not hold its caller: a host agent).
pub fn call_within(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Option<std::time::Duration>,
) -> Result<String> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, body) = request(sock, method, path, &body, timeout)?;
    if !(200..300).contains(&status) {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["fault_message"].as_str().map(String::from))
            .unwrap_or(body);
        bail!("{method} {path}: {msg}");
    }
    Ok(body)
}

/// Sends one request with a raw body (bounded by `timeout`, if any); returns the status code
/// (0 if the response had none) and the response body.
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: &str,
    timeout: Option<std::time::Duration>,
) -> Result<(u16, String)> {
    let mut s = UnixStream::connect(sock)
        .with_context(|| format!("cannot connect to {}", sock.display()))?;
    s.set_read_timeout(timeout)?;
    s.set_write_timeout(timeout)?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status: u16 = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
