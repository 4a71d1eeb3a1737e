//! The API socket's file: bound only over nothing or a stale socket, removed when the process
//! ends.
//!
//! A live update `exec`s the new binary with the same `--api-sock`: the listener closes at the
//! exec (close-on-exec) but the file stays, since exec runs no exit code; the new program finds
//! a socket nobody listens on, which is stale, and binds it again.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

/// The socket this process bound: its path and (device, inode), so that only that file is
/// removed, not one another process put there since.
static BOUND: Mutex<Option<(PathBuf, u64, u64)>> = Mutex::new(None);

/// Binds `sock`, replacing a stale socket (one nobody accepts connections on), and refusing
/// anything else that is there.
pub fn bind(sock: &Path) -> Result<UnixListener> {
    match std::fs::symlink_metadata(sock) {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot check {}", sock.display())),
        Ok(m) if !m.file_type().is_socket() => bail!(
            "{} exists and is not a socket: refusing to replace it with the API socket \
             (remove it or choose another --api-sock)",
            sock.display()
        ),
        Ok(_) => match UnixStream::connect(sock) {
            Ok(_) => bail!("another process is serving {}", sock.display()),
            // Nobody listens: left by a process that died.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(sock)
                .with_context(|| format!("cannot remove the stale socket {}", sock.display()))?,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot tell whether {} is in use", sock.display()));
            }
        },
    }
    let listener =
        UnixListener::bind(sock).with_context(|| format!("cannot listen on {}", sock.display()))?;
    let m = std::fs::symlink_metadata(sock)
        .with_context(|| format!("cannot check {}", sock.display()))?;
    *BOUND.lock().unwrap_or_else(|e| e.into_inner()) = Some((sock.to_path_buf(), m.dev(), m.ino()));
    Ok(listener)
}

/// Removes the socket this process bound, if it is still the one there.
pub fn remove() {
    let Some((path, dev, ino)) = BOUND.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
        && let Err(e) = std::fs::remove_file(&path)
    {
        tracing::warn!("cannot remove the API socket {}: {e}", path.display());
    }
}
