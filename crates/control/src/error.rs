//! The controller's errors: typed, so the API maps each to a status (Firecracker's
//! `VmmActionError`) and callers can tell a refused request from a failed one.

use crate::lifecycle::{Phase, Request};

/// How a caller should read an error (the API maps it to an HTTP status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or names something invalid: fix the request.
    InvalidInput,
    /// The request does not fit the instance's state now (e.g. pause before start).
    Conflict,
    /// The request was valid, but the host or the VM could not carry it out.
    Failed,
}

/// Errors of the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the VMM.
    #[error(transparent)]
    Vmm(#[from] rebound_vmm::Error),
    /// From the checkpoint engine.
    #[error(transparent)]
    Checkpoint(#[from] rebound_checkpoint::Error),
    /// From a snapshot file.
    #[error(transparent)]
    Snapshot(#[from] rebound_snapshot::SnapshotError),
    /// From host networking (an interface's configuration or backend).
    #[error(transparent)]
    Net(#[from] rebound_net::Error),
    /// From the memory manager (a target, the guest's classes).
    #[error(transparent)]
    Memory(#[from] rebound_memory::Error),
    /// From cloning for capacity (no clone point reached, a bad path).
    #[error(transparent)]
    Capacity(#[from] rebound_capacity::Error),
    /// The lifecycle table refuses `request` in `phase`.
    #[error("{}", transition_message(*.request, *.phase))]
    Transition {
        /// What was asked.
        request: Request,
        /// Where the instance was.
        phase: Phase,
    },
    /// A configuration value is invalid; `field` names it as the API does.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// Why, and what would be accepted.
        reason: String,
    },
    /// Something the request needs was not configured.
    #[error("{0}")]
    Missing(&'static str),
    /// A request Rebound does not support, with why.
    #[error("{0}")]
    Unsupported(String),
    /// The VM is not protected by the checkpoint engine.
    #[error("the VM is not protected: PUT /protection first")]
    NotProtected,
    /// The VM is already protected.
    #[error("the VM is already protected: DELETE /protection first")]
    AlreadyProtected,
    /// A shared region is, or is not, attached.
    #[error("region {name} {}", if *.attached { "is already attached" } else { "is not attached" })]
    Region {
        /// The region.
        name: String,
        /// Whether it is attached (the request wanted the opposite).
        attached: bool,
    },
    /// A host operation failed (a file that could not be created, a thread that could not
    /// start).
    #[error("{what}: {reason}")]
    Host {
        /// What was being done.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// A live update could not hand the VM over (the VM resumed here).
    #[error("live update: {0}")]
    Update(String),
}

fn transition_message(request: Request, phase: Phase) -> String {
    let what = request.describe();
    match phase {
        Phase::NotStarted => format!("{what}: the instance is not started"),
        Phase::Starting => format!("{what}: the instance is starting; try again when it has"),
        Phase::Exited => format!("{what}: the VM has ended"),
        Phase::Running | Phase::Paused => match request {
            Request::Configure(_) => format!("{what} cannot be changed after the instance started"),
            Request::Start | Request::LoadSnapshot | Request::Recover => {
                format!("{what}: the instance is already started")
            }
            _ => format!("{what} is not allowed while the VM is {}", phase.name()),
        },
    }
}

impl Error {
    /// How to read this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Invalid { .. } | Error::Missing(_) | Error::Unsupported(_) => {
                ErrorKind::InvalidInput
            }
            Error::Transition { .. }
            | Error::NotProtected
            | Error::AlreadyProtected
            | Error::Region { .. } => ErrorKind::Conflict,
            Error::Snapshot(_) | Error::Net(_) => ErrorKind::InvalidInput,
            Error::Memory(rebound_memory::Error::Host { .. }) => ErrorKind::Failed,
            Error::Memory(_) => ErrorKind::InvalidInput,
            Error::Capacity(rebound_capacity::Error::Invalid { .. }) => ErrorKind::InvalidInput,
            Error::Capacity(rebound_capacity::Error::Vm(e)) => vmm_kind(e),
            Error::Capacity(_) => ErrorKind::Failed,
            Error::Vmm(e) => vmm_kind(e),
            Error::Checkpoint(e) => checkpoint_kind(e),
            Error::Host { .. } | Error::Update(_) => ErrorKind::Failed,
        }
    }

    pub(crate) fn host(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Host {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// A user's file, name or setting at fault is invalid input; a KVM, memory or thread failure
/// is the host's.
fn vmm_kind(e: &rebound_vmm::Error) -> ErrorKind {
    use rebound_vmm::Error as E;
    match e {
        E::Config(_) | E::Image(_) | E::Disk(_) | E::Snapshot(_) | E::Share(_) => {
            ErrorKind::InvalidInput
        }
        E::State(_) | E::ClonePoint(_) => ErrorKind::Conflict,
        E::Component(c) => match c {
            rebound_snapshot::component::ComponentError::Component { .. } => ErrorKind::Failed,
            _ => ErrorKind::InvalidInput,
        },
        _ => ErrorKind::Failed,
    }
}

/// A sink's files are the user's (a directory given, a checkpoint named); a failed capture or
/// lost protection is the host's.
fn checkpoint_kind(e: &rebound_checkpoint::Error) -> ErrorKind {
    use rebound_checkpoint::Error as E;
    match e {
        E::Config(_) | E::Sink { .. } => ErrorKind::InvalidInput,
        E::NoCheckpoint | E::Ended { .. } => ErrorKind::Conflict,
        _ => ErrorKind::Failed,
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
