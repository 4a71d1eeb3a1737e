//! Routes and handlers. Each handler parses, calls the instance, and maps the result; the
//! configuration types, their validation and merging live in `rebound-control`, so nothing
//! here decides what is valid beyond the shape of a request.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use rebound_control::host_faults::{HostFaults, Placement};
use rebound_control::{
    BootSourceConfig, DriveConfig, ErrorKind, Instance, InstanceState, Load, MachineConfig,
    MachineConfigUpdate, Protection,
};
use serde::de::DeserializeOwned;

use crate::Hooks;
use crate::models::*;
use crate::telemetry::MetricsFile;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// An error response: a status and Firecracker's `{"fault_message": ...}` body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// A 400 with `message`.
    pub fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }
}

impl From<rebound_control::Error> for ApiError {
    fn from(e: rebound_control::Error) -> Self {
        // Firecracker answers refused requests, whatever the reason, with 400; a request the
        // host failed to carry out is a 500.
        match e.kind() {
            ErrorKind::InvalidInput | ErrorKind::Conflict => ApiError::bad(e.to_string()),
            ErrorKind::Failed => ApiError::internal(e.to_string()),
        }
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

/// Parses a JSON body strictly: an object (never an array read positionally), unknown fields
/// refused; any failure is a 400 saying why.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad(format!("invalid request body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad(
            "invalid request body: expected a JSON object",
        ));
    }
    serde_json::from_value(value).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

/// Like [`parse`], for bodies that may be left out (empty or whitespace: the default).
fn parse_optional<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse(bytes)
    }
}

/// A JSON body parsed with [`parse`].
struct Body<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad(format!("cannot read the request body: {e}")))?;
        parse(&bytes).map(Body)
    }
}

#[derive(Clone)]
struct ApiState {
    instance: Arc<Instance>,
    hooks: Hooks,
    metrics: Arc<MetricsFile>,
}

type Reply = Result<Response, ApiError>;

fn no_content() -> Reply {
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Runs an instance call off the API's event loop: it may block (building or pausing a VM,
/// reading files), and the API must keep answering meanwhile.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> rebound_control::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("internal error: {e}")))?
        .map_err(ApiError::from)
}

/// Runs `f` on the instance off the event loop.
async fn on_instance<T: Send + 'static>(
    s: &ApiState,
    f: impl FnOnce(&Instance) -> rebound_control::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let instance = s.instance.clone();
    blocking(move || f(&instance)).await
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

async fn get_version() -> Reply {
    Ok(Json(Version {
        firecracker_version: FIRECRACKER_API_VERSION.into(),
        rebound_version: env!("CARGO_PKG_VERSION").into(),
    })
    .into_response())
}

async fn get_machine_config(State(s): State<ApiState>) -> Reply {
    Ok(Json(s.instance.machine_config()).into_response())
}

async fn put_machine_config(State(s): State<ApiState>, Body(m): Body<MachineConfig>) -> Reply {
    on_instance(&s, move |i| i.set_machine_config(m)).await?;
    no_content()
}

async fn patch_machine_config(
    State(s): State<ApiState>,
    Body(u): Body<MachineConfigUpdate>,
) -> Reply {
    on_instance(&s, move |i| i.update_machine_config(&u)).await?;
    no_content()
}

async fn put_boot_source(State(s): State<ApiState>, Body(b): Body<BootSourceConfig>) -> Reply {
    on_instance(&s, move |i| i.set_boot_source_config(&b)).await?;
    no_content()
}

async fn put_drive(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Body(d): Body<DriveConfig>,
) -> Reply {
    if d.drive_id != id {
        return Err(ApiError::bad(format!(
            "drive_id: {:?} in the body does not match {:?} in the path",
            d.drive_id, id
        )));
    }
    on_instance(&s, move |i| i.set_drive(d)).await?;
    no_content()
}

/// `PATCH /drives/{id}` (Rebound): attach a mirror, or a replacement for a failed leg.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DrivePatch {
    drive_id: String,
    mirror_path: String,
}

async fn get_drive(State(s): State<ApiState>, Path(id): Path<String>) -> Reply {
    let legs = on_instance(&s, move |i| i.drive_status())
        .await?
        .ok_or_else(|| ApiError::bad("the VM has no drive".to_string()))?;
    Ok(Json(serde_json::json!({ "drive_id": id, "legs": legs })).into_response())
}

async fn patch_drive(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Body(d): Body<DrivePatch>,
) -> Reply {
    if d.drive_id != id {
        return Err(ApiError::bad(format!(
            "drive_id: {:?} in the body does not match {:?} in the path",
            d.drive_id, id
        )));
    }
    let path = PathBuf::from(d.mirror_path);
    on_instance(&s, move |i| i.attach_drive_mirror(&path)).await?;
    no_content()
}

async fn put_network_interface(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Body(n): Body<rebound_net::NetworkInterface>,
) -> Reply {
    if n.iface_id != id {
        return Err(ApiError::bad(format!(
            "iface_id: {:?} in the body does not match {:?} in the path",
            n.iface_id, id
        )));
    }
    on_instance(&s, move |i| i.set_network_interface(n)).await?;
    no_content()
}

async fn patch_network_interface(Path(id): Path<String>) -> Reply {
    Err(ApiError::bad(format!(
        "network interface {id}: rate limiters are not supported yet, so there is nothing to update"
    )))
}

async fn get_network_interfaces(State(s): State<ApiState>) -> Reply {
    Ok(Json(s.instance.network_interfaces()).into_response())
}

async fn put_actions(State(s): State<ApiState>, Body(a): Body<InstanceActionInfo>) -> Reply {
    match a.action_type {
        ActionType::InstanceStart => {
            on_instance(&s, |i| i.start().map(|_| ())).await?;
        }
        ActionType::FlushMetrics => {
            let (instance, metrics) = (s.instance.clone(), s.metrics.clone());
            tokio::task::spawn_blocking(move || metrics.flush(&instance))
                .await
                .map_err(|e| ApiError::internal(format!("internal error: {e}")))?
                .map_err(ApiError::bad)?;
        }
        ActionType::SendCtrlAltDel => {
            on_instance(&s, |i| i.shutdown(rebound_control::SHUTDOWN_GRACE)).await?;
        }
    }
    no_content()
}

async fn patch_vm(State(s): State<ApiState>, Body(v): Body<VmStateRequest>) -> Reply {
    match v.state {
        VmStateName::Paused => on_instance(&s, |i| i.pause().map(|_| ())).await?,
        VmStateName::Resumed => on_instance(&s, |i| i.resume()).await?,
    }
    no_content()
}

async fn get_vm_config(State(s): State<ApiState>) -> Reply {
    Ok(Json(s.instance.config_view()).into_response())
}

async fn get_metrics(State(s): State<ApiState>) -> Reply {
    match s.instance.metrics() {
        Some(m) => Ok(Json(m).into_response()),
        None => Err(ApiError::bad("metrics: the instance is not started")),
    }
}

async fn put_metrics(State(s): State<ApiState>, Body(m): Body<MetricsConfig>) -> Reply {
    let metrics = s.metrics.clone();
    tokio::task::spawn_blocking(move || metrics.configure(&m))
        .await
        .map_err(|e| ApiError::internal(format!("internal error: {e}")))?
        .map_err(ApiError::bad)?;
    no_content()
}

async fn put_logger(State(s): State<ApiState>, Body(l): Body<LoggerConfig>) -> Reply {
    let Some(logger) = s.hooks.logger.clone() else {
        return Err(ApiError::bad(
            "logger: this process does not let its log be configured through the API",
        ));
    };
    tokio::task::spawn_blocking(move || logger(&l))
        .await
        .map_err(|e| ApiError::internal(format!("internal error: {e}")))?
        .map_err(ApiError::bad)?;
    no_content()
}

async fn put_snapshot_create(
    State(s): State<ApiState>,
    Body(p): Body<SnapshotCreateParams>,
) -> Reply {
    let kind = match p.snapshot_type.unwrap_or(SnapshotType::Full) {
        SnapshotType::Full => rebound_snapshot::Kind::Full,
        SnapshotType::Diff => rebound_snapshot::Kind::Diff,
    };
    let path = PathBuf::from(p.snapshot_path);
    let mem = p.mem_file_path.map(PathBuf::from);
    let with_disk = p.include_disk;
    let info = on_instance(&s, move |i| {
        i.snapshot_with_memory(&path, kind, mem.as_deref(), with_disk)
    })
    .await?;
    tracing::info!(?info, "snapshot written");
    no_content()
}

async fn put_snapshot_load(State(s): State<ApiState>, Body(p): Body<SnapshotLoadParams>) -> Reply {
    if p.drive_overrides.len() > 1 {
        return Err(ApiError::bad(
            "drive_overrides: Rebound VMs have one drive; give at most one override",
        ));
    }
    let disk = p.disk_path.map(PathBuf::from).or_else(|| {
        p.drive_overrides
            .first()
            .map(|d| PathBuf::from(&d.path_on_host))
    });
    let mut chain = vec![PathBuf::from(p.snapshot_path)];
    chain.extend(p.diff_snapshot_paths.into_iter().map(PathBuf::from));
    let load = Load {
        resume: p.resume_vm,
        generation: p.generation,
        disk,
        disk_mirror: None,
        same_vm: false,
        network_overrides: p
            .network_overrides
            .into_iter()
            .map(|o| (o.iface_id, o.host_dev_name))
            .collect(),
        vsock_override: p.vsock_override.is_some(),
    };
    on_instance(&s, move |i| i.restore(&chain, &load).map(|_| ())).await?;
    no_content()
}

async fn put_protection(State(s): State<ApiState>, Body(p): Body<ProtectionConfig>) -> Reply {
    let protection = Protection {
        interval_ms: p.interval_ms,
        strategy: p.strategy,
        snapshot_dir: p.snapshot_dir.map(PathBuf::from),
        max_chain: p.max_chain.unwrap_or(16) as usize,
        standby: p.standby,
        standby_hot: p.standby_hot,
    };
    on_instance(&s, move |i| i.protect(protection)).await?;
    no_content()
}

async fn patch_protection(State(s): State<ApiState>, Body(u): Body<ProtectionUpdate>) -> Reply {
    on_instance(&s, move |i| i.move_standby(u.standby, u.standby_hot)).await?;
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
    on_instance(&s, |i| i.unprotect()).await?;
    no_content()
}

async fn put_checkpoint(State(s): State<ApiState>) -> Reply {
    let report = on_instance(&s, |i| i.checkpoint()).await?;
    Ok(Json(report).into_response())
}

async fn put_rollback(State(s): State<ApiState>, body: Bytes) -> Reply {
    // No body: the last checkpoint. `{"epoch": N}`: a checkpoint kept in the snapshot directory.
    let target = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(parse::<RollbackParams>(&body)?.epoch)
    };
    let epoch = on_instance(&s, move |i| match target {
        None => i.rollback(),
        Some(e) => i.rollback_to(e),
    })
    .await?;
    Ok(Json(serde_json::json!({"epoch": epoch})).into_response())
}

/// `PUT /memory` (Rebound): the VM's memory target.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryTarget {
    target_mib: u64,
    #[serde(default)]
    answer_ms: Option<u64>,
}

async fn put_memory(State(s): State<ApiState>, Body(t): Body<MemoryTarget>) -> Reply {
    on_instance(&s, move |i| i.set_memory_target(t.target_mib, t.answer_ms)).await?;
    no_content()
}

async fn get_memory(State(s): State<ApiState>) -> Reply {
    let view = on_instance(&s, |i| Ok(i.memory())).await?;
    Ok(Json(view).into_response())
}

/// `PUT /capacity/clone` (Rebound): a snapshot at the guest's clone point.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CloneRequest {
    snapshot_path: String,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

async fn put_capacity_clone(State(s): State<ApiState>, Body(c): Body<CloneRequest>) -> Reply {
    let info = on_instance(&s, move |i| {
        i.clone_for_capacity(std::path::Path::new(&c.snapshot_path), c.timeout_ms)
    })
    .await?;
    Ok(Json(info).into_response())
}

async fn get_capacity(State(s): State<ApiState>) -> Reply {
    let view = on_instance(&s, |i| Ok(i.capacity())).await?;
    Ok(Json(view).into_response())
}

async fn put_state_dir(State(s): State<ApiState>, Body(c): Body<StateDirConfig>) -> Reply {
    on_instance(&s, move |i| i.set_state_dir(std::path::Path::new(&c.path))).await?;
    no_content()
}

async fn get_survival(State(s): State<ApiState>) -> Reply {
    Ok(Json(s.instance.survival()).into_response())
}

async fn put_placement(State(s): State<ApiState>, Body(p): Body<Placement>) -> Reply {
    on_instance(&s, move |i| i.set_placement(p)).await?;
    no_content()
}

async fn put_update(State(s): State<ApiState>, body: Bytes) -> Reply {
    let p: UpdateParams = parse_optional(&body)?;
    s.instance.check_update()?;
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
    let r = tokio::task::spawn_blocking(move || {
        let faults = HostFaults::from_env();
        if f.failed {
            faults.fail_cpu(f.cpu)
        } else {
            faults.repair_cpu(f.cpu)
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("internal error: {e}")))?;
    r.map_err(|e| ApiError::bad(format!("cannot record the fault: {e}")))?;
    no_content()
}

async fn get_shared(State(s): State<ApiState>) -> Reply {
    Ok(Json(s.instance.shared()).into_response())
}

async fn put_shared(State(s): State<ApiState>, Path(name): Path<String>, body: Bytes) -> Reply {
    let p: SharedAttach = parse_optional(&body)?;
    let config = rebound_vmm::share::ShareConfig {
        name,
        read_only: p.read_only,
    };
    on_instance(&s, move |i| i.attach_shared(config)).await?;
    no_content()
}

async fn delete_shared(State(s): State<ApiState>, Path(name): Path<String>) -> Reply {
    on_instance(&s, move |i| i.detach_shared(&name)).await?;
    no_content()
}

async fn put_identity(State(s): State<ApiState>, Body(c): Body<IdentityConfig>) -> Reply {
    let identity = rebound_control::Identity {
        name: c.identity,
        cache: c.cache.map(|c| (c.name, c.size_mib)),
    };
    on_instance(&s, move |i| i.set_identity(Some(identity))).await?;
    no_content()
}

/// Firecracker resources Rebound does not have, each refused with why (so a client learns
/// what is missing rather than that it sent a wrong path).
async fn unsupported(method: Method, uri: Uri) -> ApiError {
    let path = uri.path();
    let why = match path.trim_start_matches('/').split('/').next() {
        Some("mmds") => {
            "MMDS (the microVM metadata service) is not supported: Rebound guests do not run its client"
        }
        Some("vsock") => {
            "vsock is not supported: Rebound guests talk to the host through their I/O ring and shared regions"
        }
        Some("balloon") => {
            "the balloon device is not supported: Rebound SDK guests do not run a balloon driver"
        }
        Some("entropy") => "the entropy device is not supported",
        Some("cpu-config") => "custom CPU templates are not supported",
        Some("hotplug") => "device hot-plug is not supported",
        Some("serial") => {
            "serial output configuration is not supported: guest output goes to stdout"
        }
        _ => return invalid(method, uri).await,
    };
    ApiError::bad(format!("{method} {path}: {why}"))
}

async fn invalid(method: Method, uri: Uri) -> ApiError {
    ApiError::bad(format!(
        "Invalid request method and/or path: {method} {}",
        uri.path()
    ))
}

/// The API's routes over `instance`, with the process-level `hooks`.
pub fn router_with(instance: Arc<Instance>, hooks: Hooks) -> Router {
    let metrics = hooks.metrics.clone().unwrap_or_default();
    app(instance, hooks, metrics)
}

fn app(instance: Arc<Instance>, hooks: Hooks, metrics: Arc<MetricsFile>) -> Router {
    let state = ApiState {
        instance,
        hooks,
        metrics,
    };
    Router::new()
        .route("/", get(get_root))
        .route("/version", get(get_version))
        .route(
            "/machine-config",
            get(get_machine_config)
                .put(put_machine_config)
                .patch(patch_machine_config),
        )
        .route("/boot-source", put(put_boot_source))
        .route(
            "/drives/{drive_id}",
            put(put_drive).get(get_drive).patch(patch_drive),
        )
        .route("/network-interfaces", get(get_network_interfaces))
        .route(
            "/network-interfaces/{iface_id}",
            put(put_network_interface).patch(patch_network_interface),
        )
        .route("/actions", put(put_actions))
        .route("/vm", axum::routing::patch(patch_vm))
        .route("/vm/config", get(get_vm_config))
        .route("/metrics", get(get_metrics).put(put_metrics))
        .route("/logger", put(put_logger))
        .route("/snapshot/create", put(put_snapshot_create))
        .route("/snapshot/load", put(put_snapshot_load))
        .route(
            "/protection",
            put(put_protection)
                .patch(patch_protection)
                .get(get_protection)
                .delete(delete_protection),
        )
        .route("/checkpoint", put(put_checkpoint))
        .route("/rollback", put(put_rollback))
        .route("/state-dir", put(put_state_dir))
        .route("/memory", put(put_memory).get(get_memory))
        .route("/capacity", get(get_capacity))
        .route("/capacity/clone", put(put_capacity_clone))
        .route("/survival", get(get_survival))
        .route("/placement", put(put_placement))
        .route("/update", put(put_update))
        .route("/faults", put(put_faults))
        .route("/shared", get(get_shared))
        .route("/shared/{name}", put(put_shared).delete(delete_shared))
        .route("/identity", put(put_identity))
        .fallback(unsupported)
        .method_not_allowed_fallback(invalid)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// The API's routes over `instance`.
pub fn router(instance: Arc<Instance>) -> Router {
    router_with(instance, Hooks::default())
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::UnixListener,
    instance: Arc<Instance>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, instance, Hooks::default(), shutdown).await
}

/// [`serve`] with process-level hooks (e.g. the logger).
pub async fn serve_with(
    listener: tokio::net::UnixListener,
    instance: Arc<Instance>,
    hooks: Hooks,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let metrics = hooks.metrics.clone().unwrap_or_default();
    // Configured metrics are flushed once a period too, as Firecracker does.
    let periodic = {
        let (metrics, instance) = (metrics.clone(), instance.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::telemetry::FLUSH_PERIOD);
            tick.tick().await;
            loop {
                tick.tick().await;
                let (m, i) = (metrics.clone(), instance.clone());
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || m.flush(&i)).await {
                    tracing::warn!("{e}");
                }
            }
        })
    };
    let r = crate::http::serve(listener, app(instance, hooks, metrics), shutdown).await;
    periodic.abort();
    r
}
