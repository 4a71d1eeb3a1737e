//! Routes and handlers. Each handler parses, calls the instance, and maps the result; nothing
//! here touches a VM directly.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use rebound_control::host_faults::{HostFaults, Placement};
use rebound_control::{Instance, InstanceState, Load, MachineConfig, Protection};
use rebound_vmm::{DiskConfig, GuestImage};
use serde::de::DeserializeOwned;

use crate::models::*;

/// Largest request body accepted.
const BODY_LIMIT: usize = 64 * 1024;

/// An error response: a status and Firecracker's `{"fault_message": ...}` body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl From<rebound_control::Error> for ApiError {
    fn from(e: rebound_control::Error) -> Self {
        ApiError::bad(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(Error {
                fault_message: self.message,
            }),
        )
            .into_response()
    }
}

/// A JSON body parsed strictly; any failure is a 400 saying why.
struct Body<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad(format!("cannot read the request body: {e}")))?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
    }
}

/// What the API echoes back (`GET /vm/config`) beyond what the instance keeps.
#[derive(Default)]
struct Echo {
    boot_source: Option<BootSource>,
    drive: Option<Drive>,
    track_dirty_pages: bool,
}

#[derive(Clone)]
struct ApiState {
    instance: Arc<Instance>,
    echo: Arc<Mutex<Echo>>,
}

impl ApiState {
    fn echo(&self) -> MutexGuard<'_, Echo> {
        self.echo.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type Reply = Result<Response, ApiError>;

fn no_content() -> Reply {
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Runs a blocking instance call (launching or pausing a VM) off the API's event loop.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> rebound_control::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::bad(format!("internal error: {e}")))?
        .map_err(ApiError::from)
}

async fn get_root(State(s): State<ApiState>) -> Reply {
    let state = s.instance.state();
    let outcome = match &state {
        InstanceState::Exited(o) => serde_json::to_value(o).ok(),
        _ => None,
    };
    Ok(Json(InstanceInfo {
        app_name: "rebound".into(),
        id: s.instance.id().into(),
        state: state.name().into(),
        vmm_version: env!("CARGO_PKG_VERSION").into(),
        outcome,
    })
    .into_response())
}

fn machine_json(s: &ApiState) -> MachineConfiguration {
    let m = s.instance.machine_config();
    MachineConfiguration {
        vcpu_count: m.vcpu_count,
        mem_size_mib: m.mem_size_mib,
        smt: false,
        track_dirty_pages: s.echo().track_dirty_pages,
        huge_pages: None,
    }
}

async fn get_machine_config(State(s): State<ApiState>) -> Reply {
    Ok(Json(machine_json(&s)).into_response())
}

fn apply_machine(s: &ApiState, m: MachineConfiguration) -> Reply {
    if m.smt {
        return Err(ApiError::bad(
            "smt: simultaneous multithreading is not supported",
        ));
    }
    if m.huge_pages.as_deref().is_some_and(|h| h != "None") {
        return Err(ApiError::bad("huge_pages: only \"None\" is supported"));
    }
    s.instance.set_machine_config(MachineConfig {
        vcpu_count: m.vcpu_count,
        mem_size_mib: m.mem_size_mib,
    })?;
    s.echo().track_dirty_pages = m.track_dirty_pages;
    no_content()
}

async fn put_machine_config(
    State(s): State<ApiState>,
    Body(m): Body<MachineConfiguration>,
) -> Reply {
    apply_machine(&s, m)
}

async fn patch_machine_config(
    State(s): State<ApiState>,
    Body(u): Body<MachineConfigurationUpdate>,
) -> Reply {
    let cur = machine_json(&s);
    apply_machine(
        &s,
        MachineConfiguration {
            vcpu_count: u.vcpu_count.unwrap_or(cur.vcpu_count),
            mem_size_mib: u.mem_size_mib.unwrap_or(cur.mem_size_mib),
            smt: u.smt.unwrap_or(false),
            track_dirty_pages: u.track_dirty_pages.unwrap_or(cur.track_dirty_pages),
            huge_pages: u.huge_pages,
        },
    )
}

async fn put_boot_source(State(s): State<ApiState>, Body(b): Body<BootSource>) -> Reply {
    if b.initrd_path.is_some() {
        return Err(ApiError::bad(
            "initrd_path: an initrd is not supported for Rebound guests",
        ));
    }
    let image = match b.kernel_image_path.strip_prefix("bundled:") {
        Some(name) => match rebound_guests::by_name(name) {
            Some(bytes) => GuestImage::from_bytes(name, bytes),
            None => {
                return Err(ApiError::bad(format!(
                    "kernel_image_path: no bundled guest named {name:?} (have: {})",
                    rebound_guests::NAMES.join(", ")
                )));
            }
        },
        None => {
            let path = PathBuf::from(&b.kernel_image_path);
            tokio::task::spawn_blocking(move || GuestImage::from_path(&path))
                .await
                .map_err(|e| ApiError::bad(format!("internal error: {e}")))?
                .map_err(|e| ApiError::bad(format!("kernel_image_path: {e}")))?
        }
    };
    s.instance
        .set_boot_source(image, b.boot_args.clone().unwrap_or_default())?;
    s.echo().boot_source = Some(b);
    no_content()
}

async fn put_drive(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Body(d): Body<Drive>,
) -> Reply {
    if d.drive_id != id {
        return Err(ApiError::bad(format!(
            "drive_id: {:?} in the body does not match {:?} in the path",
            d.drive_id, id
        )));
    }
    if let Some(other) = s.echo().drive.as_ref().filter(|o| o.drive_id != id) {
        return Err(ApiError::bad(format!(
            "drive_id: Rebound VMs have one drive, and {:?} is already configured",
            other.drive_id
        )));
    }
    if d.cache_type
        .as_deref()
        .is_some_and(|c| c != "Unsafe" && c != "Writeback")
    {
        return Err(ApiError::bad(
            "cache_type: must be \"Unsafe\" or \"Writeback\"",
        ));
    }
    if d.io_engine
        .as_deref()
        .is_some_and(|c| c != "Sync" && c != "Async")
    {
        return Err(ApiError::bad("io_engine: must be \"Sync\" or \"Async\""));
    }
    let path = PathBuf::from(&d.path_on_host);
    if !path.is_file() {
        return Err(ApiError::bad(format!(
            "path_on_host: {} is not a readable file",
            d.path_on_host
        )));
    }
    s.instance.set_disk(Some(DiskConfig::File {
        path,
        read_only: d.is_read_only,
    }))?;
    s.echo().drive = Some(d);
    no_content()
}

async fn put_actions(State(s): State<ApiState>, Body(a): Body<InstanceActionInfo>) -> Reply {
    match a.action_type {
        ActionType::InstanceStart => {
            let instance = s.instance.clone();
            blocking(move || instance.start().map(|_| ())).await?;
            no_content()
        }
        ActionType::FlushMetrics => no_content(),
        ActionType::SendCtrlAltDel => Err(ApiError::bad(
            "action_type: SendCtrlAltDel is not supported: Rebound guests have no keyboard controller",
        )),
    }
}

async fn patch_vm(State(s): State<ApiState>, Body(v): Body<VmStateRequest>) -> Reply {
    let instance = s.instance.clone();
    match v.state {
        VmStateName::Paused => blocking(move || instance.pause().map(|_| ())).await?,
        VmStateName::Resumed => blocking(move || instance.resume()).await?,
    }
    no_content()
}

async fn get_vm_config(State(s): State<ApiState>) -> Reply {
    let machine_config = machine_json(&s);
    let echo = s.echo();
    let config = FullVmConfiguration {
        machine_config,
        boot_source: echo.boot_source.clone(),
        drives: echo.drive.iter().cloned().collect(),
    };
    Ok(Json(config).into_response())
}

async fn get_metrics(State(s): State<ApiState>) -> Reply {
    match s.instance.metrics() {
        Some(m) => Ok(Json(m).into_response()),
        None => Err(ApiError::bad("metrics: the instance is not started")),
    }
}

async fn put_snapshot_create(
    State(s): State<ApiState>,
    Body(p): Body<SnapshotCreateParams>,
) -> Reply {
    let kind = match p.snapshot_type.unwrap_or(SnapshotType::Full) {
        SnapshotType::Full => rebound_snapshot::Kind::Full,
        SnapshotType::Diff => rebound_snapshot::Kind::Diff,
    };
    let instance = s.instance.clone();
    let path = PathBuf::from(p.snapshot_path);
    let info = blocking(move || instance.snapshot(&path, kind)).await?;
    tracing::info!(?info, "snapshot written");
    no_content()
}

async fn put_snapshot_load(State(s): State<ApiState>, Body(p): Body<SnapshotLoadParams>) -> Reply {
    let mut chain = vec![PathBuf::from(p.snapshot_path)];
    chain.extend(p.diff_snapshot_paths.into_iter().map(PathBuf::from));
    let instance = s.instance.clone();
    blocking(move || {
        instance
            .restore(
                &chain,
                &Load {
                    resume: p.resume_vm,
                    generation: p.generation,
                    disk: p.disk_path.map(PathBuf::from),
                    same_vm: false,
                },
            )
            .map(|_| ())
    })
    .await?;
    no_content()
}

async fn put_protection(State(s): State<ApiState>, Body(p): Body<ProtectionConfig>) -> Reply {
    let protection = Protection {
        interval_ms: p.interval_ms,
        strategy: p.strategy,
        snapshot_dir: p.snapshot_dir.map(PathBuf::from),
        max_chain: p.max_chain.unwrap_or(16) as usize,
    };
    let instance = s.instance.clone();
    blocking(move || instance.protect(protection)).await?;
    no_content()
}

async fn get_protection(State(s): State<ApiState>) -> Reply {
    let body = match s.instance.protection() {
        Some((p, stats)) => serde_json::json!({"enabled": true, "config": p, "stats": stats}),
        None => serde_json::json!({"enabled": false}),
    };
    Ok(Json(body).into_response())
}

async fn delete_protection(State(s): State<ApiState>) -> Reply {
    let instance = s.instance.clone();
    blocking(move || instance.unprotect()).await?;
    no_content()
}

async fn put_checkpoint(State(s): State<ApiState>) -> Reply {
    let instance = s.instance.clone();
    let report = blocking(move || instance.checkpoint()).await?;
    Ok(Json(report).into_response())
}

async fn put_rollback(State(s): State<ApiState>, body: Bytes) -> Reply {
    // No body: the last checkpoint. `{"epoch": N}`: a checkpoint kept in the snapshot directory.
    let target = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let p: RollbackParams = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("invalid request body: {e}")))?;
        Some(p.epoch)
    };
    let instance = s.instance.clone();
    let epoch = blocking(move || match target {
        None => instance.rollback(),
        Some(e) => instance.rollback_to(e),
    })
    .await?;
    Ok(Json(serde_json::json!({"epoch": epoch})).into_response())
}

async fn put_state_dir(State(s): State<ApiState>, Body(c): Body<StateDirConfig>) -> Reply {
    s.instance.set_state_dir(std::path::Path::new(&c.path))?;
    no_content()
}

async fn get_survival(State(s): State<ApiState>) -> Reply {
    Ok(Json(s.instance.survival()).into_response())
}

async fn put_placement(State(s): State<ApiState>, Body(p): Body<Placement>) -> Reply {
    let instance = s.instance.clone();
    blocking(move || instance.set_placement(p)).await?;
    no_content()
}

async fn put_update(State(s): State<ApiState>, body: Bytes) -> Reply {
    let p: UpdateParams = if body.iter().all(u8::is_ascii_whitespace) {
        UpdateParams::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("invalid request body: {e}")))?
    };
    let survival = s.instance.survival();
    if survival.state_dir.is_none() {
        return Err(ApiError::bad(
            "live update needs the VM in a state directory (PUT /state-dir before starting)",
        ));
    }
    if s.instance.protection().is_none() {
        return Err(ApiError::bad("live update needs the VM protected"));
    }
    let instance = s.instance.clone();
    // The hand-over replaces this process: answer first. The guest keeps running until the
    // hand-over pauses it, so the wait is not downtime.
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(20));
        if let Err(e) = instance.live_update(p.binary.map(PathBuf::from)) {
            tracing::error!("live update failed: {e}");
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"status": "updating"})),
    )
        .into_response())
}

async fn put_faults(Body(f): Body<FaultParams>) -> Reply {
    let faults = HostFaults::from_env();
    let r = if f.failed {
        faults.fail_cpu(f.cpu)
    } else {
        faults.repair_cpu(f.cpu)
    };
    r.map_err(|e| ApiError::bad(format!("cannot record the fault: {e}")))?;
    no_content()
}

async fn get_shared(State(s): State<ApiState>) -> Reply {
    Ok(Json(s.instance.shared()).into_response())
}

async fn put_shared(State(s): State<ApiState>, Path(name): Path<String>, body: Bytes) -> Reply {
    let p: SharedAttach = if body.iter().all(u8::is_ascii_whitespace) {
        SharedAttach::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("invalid request body: {e}")))?
    };
    let instance = s.instance.clone();
    let config = rebound_vmm::share::ShareConfig {
        name,
        read_only: p.read_only,
    };
    blocking(move || instance.attach_shared(config)).await?;
    no_content()
}

async fn delete_shared(State(s): State<ApiState>, Path(name): Path<String>) -> Reply {
    let instance = s.instance.clone();
    blocking(move || instance.detach_shared(&name)).await?;
    no_content()
}

async fn put_identity(State(s): State<ApiState>, Body(c): Body<IdentityConfig>) -> Reply {
    s.instance.set_identity(Some(rebound_control::Identity {
        name: c.identity,
        cache: c.cache.map(|c| (c.name, c.size_mib)),
    }))?;
    no_content()
}

async fn invalid(method: Method, uri: Uri) -> ApiError {
    ApiError::bad(format!(
        "Invalid request method and/or path: {method} {}",
        uri.path()
    ))
}

/// The API's routes over `instance`.
pub fn router(instance: Arc<Instance>) -> Router {
    let state = ApiState {
        instance,
        echo: Arc::new(Mutex::new(Echo::default())),
    };
    Router::new()
        .route("/", get(get_root))
        .route(
            "/machine-config",
            get(get_machine_config)
                .put(put_machine_config)
                .patch(patch_machine_config),
        )
        .route("/boot-source", put(put_boot_source))
        .route("/drives/{drive_id}", put(put_drive))
        .route("/actions", put(put_actions))
        .route("/vm", axum::routing::patch(patch_vm))
        .route("/vm/config", get(get_vm_config))
        .route("/metrics", get(get_metrics))
        .route("/snapshot/create", put(put_snapshot_create))
        .route("/snapshot/load", put(put_snapshot_load))
        .route(
            "/protection",
            put(put_protection)
                .get(get_protection)
                .delete(delete_protection),
        )
        .route("/checkpoint", put(put_checkpoint))
        .route("/rollback", put(put_rollback))
        .route("/state-dir", put(put_state_dir))
        .route("/survival", get(get_survival))
        .route("/placement", put(put_placement))
        .route("/update", put(put_update))
        .route("/faults", put(put_faults))
        .route("/shared", get(get_shared))
        .route("/shared/{name}", put(put_shared).delete(delete_shared))
        .route("/identity", put(put_identity))
        .fallback(invalid)
        .method_not_allowed_fallback(invalid)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::UnixListener,
    instance: Arc<Instance>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(instance))
        .with_graceful_shutdown(shutdown)
        .await
}
