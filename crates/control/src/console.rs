//! The console part: where the guest's output goes (the user's writer) and, once a VM is
//! built, the output commit in front of it. The user's writer is shared, not handed over, so a
//! build that fails leaves it in place for the next attempt.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use rebound_checkpoint::OutputCommit;

use crate::lifecycle::{Phase, Request};
use crate::{Error, Result};

type Shared = Arc<Mutex<Box<dyn Write + Send>>>;

/// The instance's console.
pub struct Console {
    user: Shared,
    output: Mutex<Option<Arc<OutputCommit>>>,
}

/// A handle on the user's writer (what output commit, or a state directory's log, writes to).
struct UserWriter(Shared);

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Write for UserWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        lock(&self.0).write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.0).flush()
    }
}

impl Console {
    /// Guest output goes to `user`.
    pub fn new(user: Box<dyn Write + Send>) -> Self {
        Self {
            user: Arc::new(Mutex::new(user)),
            output: Mutex::new(None),
        }
    }

    /// A writer to the user's console, for a VM being built.
    pub fn user(&self) -> Box<dyn Write + Send> {
        Box::new(UserWriter(self.user.clone()))
    }

    /// The built VM's output commit.
    pub fn output(&self) -> Result<Arc<OutputCommit>> {
        lock(&self.output).clone().ok_or(Error::Transition {
            request: Request::Observe,
            phase: Phase::NotStarted,
        })
    }

    /// Records the built VM's output commit.
    pub fn attach(&self, output: Arc<OutputCommit>) {
        *lock(&self.output) = Some(output);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_build_leaves_the_console_usable() {
        let buf = Buf::default();
        let c = Console::new(Box::new(buf.clone()));
        assert!(c.output().is_err());
        {
            // A build that fails drops its output commit.
            let o = OutputCommit::new(c.user());
            o.writer().write_all(b"first ").unwrap();
        }
        let o = OutputCommit::new(c.user());
        o.writer().write_all(b"second").unwrap();
        c.attach(o);
        assert!(c.output().is_ok());
        assert_eq!(&*lock(&buf.0), b"first second");
    }
}
