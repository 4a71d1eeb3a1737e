//! The control API over a real Unix socket, driving real VMs; every request body sent and every
//! JSON response received is checked against `openapi.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rebound_control::Instance;
use rebound_devices::console::SharedBuffer;
use serde_json::{Value, json};

struct Server {
    sock: PathBuf,
    console: SharedBuffer,
    instance: Arc<Instance>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let console = SharedBuffer::new();
        let instance = Arc::new(Instance::new("test-vm", Box::new(console.clone())));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (inst, path) = (instance.clone(), sock.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::bind(&path).unwrap();
                ready_tx.send(()).unwrap();
                rebound_api::serve(listener, inst, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
            });
        });
        ready_rx.recv().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Server {
            sock,
            console,
            instance,
            rt,
            _dir: dir,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Sends a well-formed request (its body must satisfy the spec); returns status and JSON,
    /// after checking the response against the spec.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        if let Some(b) = &body {
            assert!(
                spec().request_valid(method, path, b),
                "the spec refuses {method} {path} {b}"
            );
        }
        let raw = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, text) = self.raw(method, path, raw.as_bytes());
        let json: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        spec().check_response(method, path, status, &json);
        (status, json)
    }

    fn raw(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        self.rt
            .block_on(request(&self.sock, method, path, body.to_vec()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(vm) = self.instance.vm() {
            vm.stop();
            vm.wait();
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn request(sock: &Path, method: &str, path: &str, body: Vec<u8>) -> (u16, String) {
    let stream = tokio::net::UnixStream::connect(sock).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

struct Spec(Value);

fn spec() -> &'static Spec {
    static SPEC: std::sync::OnceLock<Spec> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        Spec(serde_json::from_str(rebound_api::OPENAPI).expect("openapi.json parses"))
    })
}

impl Spec {
    fn operation(&self, method: &str, path: &str) -> Option<&Value> {
        let paths = self.0["paths"].as_object()?;
        let (_, item) = paths.iter().find(|(template, _)| matches(template, path))?;
        item.get(method.to_lowercase())
    }

    fn validate(&self, schema_ref: &str, value: &Value) -> Result<(), String> {
        let mut root = self.0.clone();
        root["$ref"] = json!(schema_ref);
        let v = jsonschema::validator_for(&root).map_err(|e| e.to_string())?;
        let errors: Vec<String> = v.iter_errors(value).map(|e| e.to_string()).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn request_valid(&self, method: &str, path: &str, body: &Value) -> bool {
        let Some(op) = self.operation(method, path) else {
            return false;
        };
        let Some(r) = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].as_str()
        else {
            return false;
        };
        self.validate(r, body).is_ok()
    }

    fn check_response(&self, method: &str, path: &str, status: u16, body: &Value) {
        let Some(op) = self.operation(method, path) else {
            assert_eq!(
                status, 400,
                "{method} {path} is not in the spec, so it must be refused"
            );
            return;
        };
        let resp = &op["responses"][status.to_string()];
        assert!(
            !resp.is_null(),
            "{method} {path} answered {status}, which the spec does not list"
        );
        if let Some(r) = resp["content"]["application/json"]["schema"]["$ref"].as_str()
            && let Err(e) = self.validate(r, body)
        {
            panic!("{method} {path} {status} response {body} does not match {r}: {e}");
        }
    }
}

fn matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<_>, Vec<_>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len() && t.iter().zip(&p).all(|(a, b)| a.starts_with('{') || a == b)
}

fn ticks(out: &str) -> usize {
    out.lines().filter(|l| l.starts_with("tick ")).count()
}

fn wait_ticks(s: &Server, n: usize) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if ticks(&s.console.text()) >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn start_ticking(s: &Server) {
    assert_eq!(
        s.call(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 2, "mem_size_mib": 64}))
        )
        .0,
        204
    );
    let boot = json!({"kernel_image_path": "bundled:testguest", "boot_args": "ticks 5"});
    assert_eq!(s.call("PUT", "/boot-source", Some(boot)).0, 204);
    assert_eq!(
        s.call(
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"}))
        )
        .0,
        204
    );
    assert!(wait_ticks(s, 3), "guest never ticked: {}", s.console.text());
}

#[test]
fn firecracker_flow_start_pause_resume_metrics() {
    let s = Server::start();
    let (st, info) = s.call("GET", "/", None);
    assert_eq!((st, info["state"].as_str()), (200, Some("Not started")));
    assert_eq!(info["app_name"], "rebound");
    assert_eq!(info["id"], "test-vm");

    start_ticking(&s);
    let (_, info) = s.call("GET", "/", None);
    assert_eq!(info["state"], "Running");

    assert_eq!(
        s.call("PATCH", "/vm", Some(json!({"state": "Paused"}))).0,
        204
    );
    assert_eq!(s.call("GET", "/", None).1["state"], "Paused");
    let frozen = ticks(&s.console.text());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ticks(&s.console.text()),
        frozen,
        "the guest progressed while paused"
    );

    assert_eq!(
        s.call("PATCH", "/vm", Some(json!({"state": "Resumed"}))).0,
        204
    );
    assert!(wait_ticks(&s, frozen + 3), "the guest did not resume");

    let (st, m) = s.call("GET", "/metrics", None);
    assert_eq!(st, 200);
    assert!(m["hypercalls"]["console_write"].as_u64().unwrap() >= 6);
    assert_eq!(m["pause"]["count"], 1);
    assert_eq!(m["interrupts_injected"], 0);
    assert!(m["exits"]["io_out"].as_u64().unwrap() > 0);

    let (st, cfg) = s.call("GET", "/vm/config", None);
    assert_eq!(st, 200);
    assert_eq!(cfg["machine-config"]["vcpu_count"], 2);
    assert_eq!(cfg["boot-source"]["kernel_image_path"], "bundled:testguest");

    // Configuration is frozen once started.
    let (st, e) = s.call(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 1, "mem_size_mib": 64})),
    );
    assert_eq!(st, 400);
    assert!(
        e["fault_message"]
            .as_str()
            .unwrap()
            .contains("after the instance started")
    );
}

#[test]
fn bad_requests_get_400_with_a_reason_and_the_vm_keeps_running() {
    let s = Server::start();
    // Before start.
    let cases: Vec<(&str, &str, &[u8], &str)> =
        vec![
        (
            "PUT",
            "/machine-config",
            b"{not json",
            "invalid request body",
        ),
        (
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": 1, "mem_size_mib": 64, "bogus": 1}"#,
            "unknown field",
        ),
        (
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": "two", "mem_size_mib": 64}"#,
            "invalid type",
        ),
        (
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": 0, "mem_size_mib": 64}"#,
            "vcpu_count",
        ),
        (
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": 1, "mem_size_mib": 1048576}"#,
            "mem_size_mib",
        ),
        (
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": 1, "mem_size_mib": 63}"#,
            "multiple of 2",
        ),
        (
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": 1, "mem_size_mib": 64, "smt": true}"#,
            "smt",
        ),
        (
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": -1, "mem_size_mib": 64}"#,
            "invalid value",
        ),
        (
            "PUT",
            "/boot-source",
            br#"{"kernel_image_path": "/nonexistent.elf"}"#,
            "/nonexistent.elf",
        ),
        (
            "PUT",
            "/boot-source",
            br#"{"kernel_image_path": "bundled:nope"}"#,
            "no bundled guest",
        ),
        (
            "PUT",
            "/boot-source",
            br#"{"kernel_image_path": "bundled:demo", "initrd_path": "/x"}"#,
            "initrd",
        ),
        (
            "PUT",
            "/drives/rootfs",
            br#"{"drive_id": "other", "path_on_host": "/etc/hostname", "is_root_device": true}"#,
            "does not match",
        ),
        (
            "PUT",
            "/drives/rootfs",
            br#"{"drive_id": "rootfs", "path_on_host": "/nonexistent", "is_root_device": true}"#,
            "path_on_host",
        ),
        (
            "PUT",
            "/actions",
            br#"{"action_type": "InstanceStart"}"#,
            "no boot source",
        ),
        (
            "PUT",
            "/actions",
            br#"{"action_type": "SendCtrlAltDel"}"#,
            "not supported",
        ),
        (
            "PUT",
            "/actions",
            br#"{"action_type": "Reboot"}"#,
            "unknown variant",
        ),
        ("PATCH", "/vm", br#"{"state": "Paused"}"#, "not started"),
        ("GET", "/metrics", b"", "not started"),
        ("GET", "/nope", b"", "Invalid request method and/or path"),
        (
            "DELETE",
            "/machine-config",
            b"",
            "Invalid request method and/or path",
        ),
        ("PUT", "/machine-config", b"", "invalid request body"),
        ("PUT", "/placement", br#"{"cpus": [999]}"#, "not usable here"),
        ("PUT", "/placement", br#"{"recovery": "failover"}"#, "standby host"),
        ("PUT", "/placement", br#"{"recovery": "teleport"}"#, "unknown variant"),
        ("PUT", "/faults", br#"{"cpu": -1, "failed": true}"#, "invalid request body"),
        ("PUT", "/faults", br#"{"cpu": 0}"#, "missing field"),
        ("PUT", "/state-dir", br#"{"path": "/proc/rebound-x"}"#, "cannot create"),
        ("PUT", "/update", b"", "state directory"),
        ("PUT", "/update", br#"{"binary": 5}"#, "invalid request body"),
    ];
    for (method, path, body, want) in &cases {
        let (st, text) = s.raw(method, path, body);
        assert_eq!(st, 400, "{method} {path} {}", String::from_utf8_lossy(body));
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        let msg = v["fault_message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(want),
            "{method} {path}: {msg:?} should mention {want:?}"
        );
        // Whatever the spec says about these bodies, it must not call them valid.
        if !body.is_empty()
            && let Ok(b) = serde_json::from_slice::<Value>(body)
            && spec().request_valid(method, path, &b)
        {
            // A valid shape refused for reasons a schema cannot express (instance state, the
            // host's files and RAM, a path id against a body id): only these may disagree.
            let beyond_schema = [
                "no boot source",
                "not started",
                "/nonexistent",
                "no bundled guest",
                "mem_size_mib",
                "does not match",
                "path_on_host",
                "not usable here",
                "standby host",
                "cannot create",
                "state directory",
            ];
            assert!(
                beyond_schema.iter().any(|w| want.contains(w)),
                "spec accepts {method} {path} {}",
                String::from_utf8_lossy(body)
            );
        }
    }
    let huge = vec![b' '; 128 * 1024];
    assert_eq!(s.raw("PUT", "/machine-config", &huge).0, 400);

    // While running: hostile requests change nothing.
    start_ticking(&s);
    for (method, path, body, _) in &cases[..8] {
        assert_eq!(s.raw(method, path, body).0, 400);
    }
    assert_eq!(
        s.raw("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#)
            .0,
        400
    );
    assert_eq!(s.raw("PATCH", "/vm", br#"{"state": "Frozen"}"#).0, 400);
    let before = ticks(&s.console.text());
    assert!(wait_ticks(&s, before + 3), "the VM stopped making progress");
    assert_eq!(s.call("GET", "/", None).1["state"], "Running");
}

#[test]
fn every_spec_operation_is_routed_and_valid_examples_are_accepted() {
    let s = Server::start();
    let paths = spec().0["paths"].as_object().unwrap().clone();
    for (template, item) in &paths {
        for method in item.as_object().unwrap().keys() {
            let path = template.replace("{drive_id}", "rootfs");
            let (_, text) = s.raw(&method.to_uppercase(), &path, b"");
            assert!(
                !text.contains("Invalid request method and/or path"),
                "{method} {template} is in the spec but not routed"
            );
        }
    }
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(1 << 20).unwrap();
    let examples = vec![
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 32, "smt": false, "track_dirty_pages": true, "huge_pages": "None"}),
        ),
        ("PATCH", "/machine-config", json!({"mem_size_mib": 64})),
        (
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": "bundled:testguest", "boot_args": "hello"}),
        ),
        (
            "PUT",
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": disk.path(), "is_root_device": true, "is_read_only": false, "cache_type": "Writeback", "io_engine": "Sync"}),
        ),
        ("PUT", "/actions", json!({"action_type": "FlushMetrics"})),
    ];
    for (method, path, body) in examples {
        assert!(
            spec().request_valid(method, path, &body),
            "spec refuses its own example {method} {path} {body}"
        );
        let (st, e) = s.call(method, path, Some(body.clone()));
        assert_eq!(st, 204, "{method} {path} {body}: {e}");
    }
    let (_, m) = s.call("GET", "/machine-config", None);
    assert_eq!(
        m,
        json!({"vcpu_count": 1, "mem_size_mib": 64, "smt": false, "track_dirty_pages": true})
    );
    let (st, _) = s.call(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(st, 204);
    let vm = s.instance.vm().unwrap();
    assert_eq!(vm.wait(), rebound_vmm::VmOutcome::Exited { status: 0 });
    let (_, info) = s.call("GET", "/", None);
    assert_eq!(info["state"], "Exited");
    assert_eq!(info["outcome"], json!({"kind": "exited", "status": 0}));
}

#[test]
fn snapshot_protection_checkpoint_and_rollback_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start();
    start_ticking(&s);
    // Rollback without protection is refused with a reason.
    let (st, e) = s.call("PUT", "/rollback", None);
    assert_eq!(st, 400);
    assert!(
        e["fault_message"]
            .as_str()
            .unwrap()
            .contains("not protected")
    );
    assert_eq!(
        s.call("GET", "/protection", None).1,
        json!({"enabled": false})
    );

    let snap = dir.path().join("a.snap");
    assert_eq!(
        s.call(
            "PUT",
            "/snapshot/create",
            Some(json!({"snapshot_path": snap, "snapshot_type": "Full"}))
        )
        .0,
        204
    );
    let diff = dir.path().join("b.snap");
    assert_eq!(
        s.call(
            "PUT",
            "/snapshot/create",
            Some(
                json!({"snapshot_path": diff, "snapshot_type": "Diff", "mem_file_path": "/ignored"})
            )
        )
        .0,
        204
    );
    assert!(snap.exists() && diff.exists());

    // A long chain: compaction must not merge epoch 1 away before the named rollback below.
    let p = json!({"interval_ms": 20, "strategy": "double_buffered", "snapshot_dir": dir.path().join("cps"), "max_chain": 100000});
    assert_eq!(s.call("PUT", "/protection", Some(p.clone())).0, 204);
    assert_eq!(
        s.call("PUT", "/protection", Some(p)).0,
        400,
        "already protected"
    );
    let (st, r) = s.call("PUT", "/checkpoint", None);
    assert_eq!(st, 200);
    assert!(
        r["epoch"].as_u64().unwrap() >= 2 && r["acked"] == json!(true),
        "{r}"
    );
    let (st, r) = s.call("PUT", "/rollback", None);
    assert_eq!(st, 200);
    assert!(r["epoch"].as_u64().unwrap() >= 2);
    let (_, info) = s.call("GET", "/protection", None);
    assert_eq!(info["enabled"], true);
    assert!(info["stats"]["rollbacks"].as_u64().unwrap() >= 1);
    // A named checkpoint from the snapshot directory; unknown ones and bad bodies are refused.
    let (st, r) = s.call("PUT", "/rollback", Some(json!({"epoch": 1})));
    assert_eq!((st, r["epoch"].as_u64()), (200, Some(1)));
    let (st, e) = s.call("PUT", "/rollback", Some(json!({"epoch": 12345})));
    assert_eq!(st, 400);
    assert!(
        e["fault_message"]
            .as_str()
            .unwrap()
            .contains("not in the directory"),
        "{e}"
    );
    assert_eq!(s.raw("PUT", "/rollback", br#"{"epoch": "x"}"#).0, 400);
    let before = ticks(&s.console.text());
    assert!(
        wait_ticks(&s, before + 2),
        "the guest runs on after the rollback"
    );
    assert_eq!(s.call("DELETE", "/protection", None).0, 204);
    assert_eq!(s.call("DELETE", "/protection", None).0, 400);

    // Load into a fresh instance, Firecracker style: paused until resumed.
    let t = Server::start();
    let load = json!({"snapshot_path": snap, "diff_snapshot_paths": [diff], "mem_backend": {"backend_type": "File", "backend_path": "/ignored"}});
    assert_eq!(t.call("PUT", "/snapshot/load", Some(load)).0, 204);
    assert_eq!(t.call("GET", "/", None).1["state"], "Paused");
    assert_eq!(
        t.call(
            "PUT",
            "/snapshot/load",
            Some(json!({"snapshot_path": snap}))
        )
        .0,
        400,
        "only once"
    );
    assert_eq!(
        t.call("PATCH", "/vm", Some(json!({"state": "Resumed"}))).0,
        204
    );
    let t0 = Instant::now();
    while ticks(&t.console.text()) < 2 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        ticks(&t.console.text()) >= 2,
        "the restored guest ticks: {}",
        t.console.text()
    );

    // A corrupt snapshot is refused by name, and the instance stays loadable.
    let u = Server::start();
    let mut bytes = std::fs::read(&snap).unwrap();
    bytes[4096 + 1] ^= 0xff;
    let bad = dir.path().join("bad.snap");
    std::fs::write(&bad, bytes).unwrap();
    let (st, e) = u.call("PUT", "/snapshot/load", Some(json!({"snapshot_path": bad})));
    assert_eq!(st, 400);
    assert!(
        e["fault_message"]
            .as_str()
            .unwrap()
            .contains("section \"vm\""),
        "{e}"
    );
    assert_eq!(u.call("GET", "/", None).1["state"], "Not started");
    assert_eq!(
        u.call(
            "PUT",
            "/snapshot/load",
            Some(json!({"snapshot_path": snap, "resume_vm": true}))
        )
        .0,
        204
    );
    assert_eq!(u.call("GET", "/", None).1["state"], "Running");
}

#[test]
fn a_vm_in_a_state_directory_through_the_api() {
    let s = Server::start();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let dir = shm.path().join("vm");
    let calls = [
        ("PUT", "/state-dir", json!({"path": dir})),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 32}),
        ),
        (
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": "bundled:testguest", "boot_args": "ticks 20"}),
        ),
        (
            "PUT",
            "/placement",
            json!({"cpus": [0], "recovery": "restart_from_checkpoint"}),
        ),
        ("PUT", "/actions", json!({"action_type": "InstanceStart"})),
    ];
    for (method, path, body) in calls {
        let (st, e) = s.call(method, path, Some(body.clone()));
        assert_eq!(st, 204, "{method} {path} {body}: {e}");
    }
    // Protected from the start, with the strategy crash recovery needs.
    let (_, p) = s.call("GET", "/protection", None);
    assert_eq!(p["config"]["strategy"], "pre_image", "{p}");
    let (_, v) = s.call("GET", "/survival", None);
    assert_eq!(v["state_dir"], json!(dir), "{v}");
    assert_eq!(v["vcpu_cpus"], json!([[0]]), "{v}");
    assert_eq!(v["placement"]["recovery"], "restart_from_checkpoint");
    assert!(dir.join("memory").exists() && dir.join("console.log").exists());
    // Too late for a state directory now.
    let (st, e) = s.call(
        "PUT",
        "/state-dir",
        Some(json!({"path": shm.path().join("other")})),
    );
    assert_eq!(st, 400, "{e}");
    s.instance.vm().unwrap().stop();
}
