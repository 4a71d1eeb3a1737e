//! Fault injection for tests and operators: kill points inside the commit path and failing
//! writes to the state directory. Configured once per process from `REBOUND_FAULTS` (or by
//! [`arm`]), e.g. `kill:after-record:5,fail-write:ENOSPC:3`: the process kills itself with
//! SIGKILL the 5th time it passes `after-record`; the 3rd state-directory write and every later
//! one fail with ENOSPC.
//!
//! Kill points: `before-record`, `after-record` (record committed, journal not yet reset),
//! `after-journal-reset`, `journal-append` (a page's old contents journaled: at its first
//! write, protection not yet lifted; or, for a page kept writable, at the checkpoint).

use std::io;
use std::sync::Mutex;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Plan {
    /// (point, remaining passes before the kill)
    kill: Option<(String, u64)>,
    /// (errno, remaining writes before failures start)
    fail_writes: Option<(i32, u64)>,
}

static PLAN: Mutex<Option<Plan>> = Mutex::new(None);

fn plan() -> std::sync::MutexGuard<'static, Option<Plan>> {
    let mut g = PLAN.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_none() {
        *g = Some(
            std::env::var("REBOUND_FAULTS")
                .ok()
                .and_then(|s| parse(&s).ok())
                .unwrap_or_default(),
        );
    }
    g
}

fn errno(name: &str) -> Option<i32> {
    match name {
        "ENOSPC" => Some(libc::ENOSPC),
        "EIO" => Some(libc::EIO),
        "EDQUOT" => Some(libc::EDQUOT),
        _ => None,
    }
}

fn parse(spec: &str) -> Result<Plan, String> {
    let mut p = Plan::default();
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        let parts: Vec<&str> = item.split(':').collect();
        match parts.as_slice() {
            ["kill", point, n] => {
                let n: u64 = n.parse().map_err(|_| format!("bad count in {item:?}"))?;
                p.kill = Some((point.to_string(), n.max(1)));
            }
            ["fail-write", e, n] => {
                let e = errno(e)
                    .ok_or_else(|| format!("unknown errno in {item:?} (ENOSPC, EIO, EDQUOT)"))?;
                let n: u64 = n.parse().map_err(|_| format!("bad count in {item:?}"))?;
                p.fail_writes = Some((e, n.max(1)));
            }
            _ => {
                return Err(format!(
                    "cannot parse fault {item:?} (kill:POINT:N or fail-write:ERRNO:N)"
                ));
            }
        }
    }
    Ok(p)
}

/// Replaces the plan (API, tests). Errors name the bad item.
pub fn arm(spec: &str) -> Result<(), String> {
    let p = parse(spec)?;
    *PLAN.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    Ok(())
}

/// A kill point: the process dies here (SIGKILL, no cleanup) if armed and its count is reached.
pub fn point(name: &str) {
    let mut g = plan();
    if let Some(Some((point, left))) = g.as_mut().map(|p| p.kill.as_mut())
        && point == name
    {
        *left -= 1;
        if *left == 0 {
            tracing::warn!(point = name, "fault injection: killing the process");
            // SAFETY: sends a signal to this process; nothing is touched afterwards.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}

/// Called before each write to the state directory: fails it if armed.
pub fn check_write(what: &str) -> io::Result<()> {
    let mut g = plan();
    if let Some(Some((e, left))) = g.as_mut().map(|p| p.fail_writes.as_mut()) {
        if *left <= 1 {
            tracing::warn!(what, errno = *e, "fault injection: failing a state write");
            return Err(io::Error::from_raw_os_error(*e));
        }
        *left -= 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_or_name_the_bad_item() {
        let p = parse("kill:after-record:3,fail-write:ENOSPC:2").unwrap();
        assert_eq!(p.kill, Some(("after-record".into(), 3)));
        assert_eq!(p.fail_writes, Some((libc::ENOSPC, 2)));
        assert!(parse("kill:x").unwrap_err().contains("kill:x"));
        assert!(
            parse("fail-write:EBADNESS:1")
                .unwrap_err()
                .contains("EBADNESS")
        );
        assert_eq!(parse("").unwrap(), Plan::default());
    }
}
