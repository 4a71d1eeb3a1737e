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
            "not started",
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
                json!({"snapshot_path": diff, "snapshot_type": "Diff", "mem_file_path": dir.path().join("diff.mem")})
            )
        )
        .0,
        204
    );
    assert!(snap.exists() && diff.exists());
    // Firecracker's mem_file_path: a raw image of guest memory (the diff's pages only).
    let image = std::fs::read(dir.path().join("diff.mem")).unwrap();
    assert_eq!(image.len(), 64 << 20, "the memory size");
    assert!(image.iter().any(|&b| b != 0), "the diff's pages are in it");

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
    // Moving the standby of a VM protected without replication is refused with a reason.
    let (st, e) = s.call(
        "PATCH",
        "/protection",
        Some(json!({"standby": "127.0.0.1:9", "standby_hot": true})),
    );
    assert_eq!(st, 400);
    assert!(
        e["fault_message"]
            .as_str()
            .unwrap()
            .contains("without replication"),
        "{e}"
    );
    assert_eq!(
        s.raw("PATCH", "/protection", br#"{"standby": 7}"#).0,
        400,
        "a bad body"
    );
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

/// Writes `raw` on a fresh connection and reads the answer until the server closes it.
fn raw_exchange(sock: &Path, raw: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(raw).unwrap();
    let mut resp = Vec::new();
    let _ = c.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn fault(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
    v["fault_message"].as_str().unwrap_or_default().to_string()
}

#[test]
fn http_framing_errors_get_a_fault_message_and_never_hang() {
    let s = Server::start();
    let many_headers: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
    let long_path = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(5000));
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400, "malformed request"),
        (
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
            400,
            "invalid Content-Length",
        ),
        (
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: 18446744073709551616\r\n\r\n"
                .to_vec(),
            400,
            "invalid Content-Length",
        ),
        (
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n".to_vec(),
            400,
            "at most",
        ),
        (
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: 10485760\r\n\r\n".to_vec(),
            400,
            "at most",
        ),
        (
            format!("GET / HTTP/1.1\r\n{many_headers}\r\n").into_bytes(),
            400,
            "too many headers",
        ),
        (long_path.into_bytes(), 400, "at most"),
        (
            b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            400,
            "Content-Length",
        ),
    ];
    for (raw, status, want) in &cases {
        let t0 = Instant::now();
        let (st, body) = raw_exchange(&s.sock, raw);
        let msg = fault(&body);
        assert_eq!(st, *status, "{}: {body}", String::from_utf8_lossy(raw));
        assert!(msg.contains(want), "{msg:?} should mention {want:?}");
        assert!(t0.elapsed() < Duration::from_secs(3), "answered at once");
    }
    // A body announced but never sent: the API answers it (with a reason) after its timeout,
    // and serves everyone else meanwhile.
    use std::io::{Read, Write};
    let mut stalled = std::os::unix::net::UnixStream::connect(&s.sock).unwrap();
    stalled
        .write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    assert_eq!(
        s.call("GET", "/", None).0,
        200,
        "others are served meanwhile"
    );
    stalled
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut resp = String::new();
    let _ = stalled.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("did not arrive"), "{resp}");
    // Keep-alive still works for well-formed requests.
    let mut c = std::os::unix::net::UnixStream::connect(&s.sock).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\n\r\nGET /version HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 2, "{resp}");
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn a_named_pipe_never_blocks_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let s = Server::start();
    let t0 = Instant::now();
    for (method, path, body) in [
        ("PUT", "/snapshot/load", json!({"snapshot_path": fifo})),
        ("PUT", "/boot-source", json!({"kernel_image_path": fifo})),
        (
            "PUT",
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": fifo, "is_root_device": true}),
        ),
    ] {
        let (st, e) = s.call(method, path, Some(body));
        assert_eq!(st, 400, "{method} {path}");
        assert!(
            e["fault_message"]
                .as_str()
                .unwrap()
                .contains("not a regular file"),
            "{e}"
        );
    }
    start_ticking(&s);
    let (st, e) = s.call(
        "PUT",
        "/snapshot/create",
        Some(json!({"snapshot_path": fifo})),
    );
    assert_eq!(st, 400, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(20), "nothing waited");
    assert_eq!(s.call("GET", "/", None).1["state"], "Running");
}

#[test]
fn refused_requests_change_nothing_and_the_instance_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start();
    // A file that is not a Rebound guest is refused when it is named, not at start.
    let junk = dir.path().join("hello.sh");
    std::fs::write(&junk, b"#!/bin/sh\necho hi\n").unwrap();
    let (st, e) = s.call(
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": junk})),
    );
    assert_eq!(st, 400);
    assert!(
        e["fault_message"]
            .as_str()
            .unwrap()
            .starts_with("kernel_image_path:"),
        "{e}"
    );
    assert!(
        s.call("GET", "/vm/config", None)
            .1
            .get("boot-source")
            .is_none()
    );
    // A refused start (its drive went away after it was configured) and a refused load
    // leave the instance as it was: it can still be started.
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 16]).unwrap();
    let drive = json!({"drive_id": "rootfs", "path_on_host": disk, "is_root_device": true});
    assert_eq!(s.call("PUT", "/drives/rootfs", Some(drive)).0, 204);
    let boot = json!({"kernel_image_path": "bundled:testguest", "boot_args": "ticks 5"});
    assert_eq!(s.call("PUT", "/boot-source", Some(boot)).0, 204);
    std::fs::remove_file(&disk).unwrap();
    let start = json!({"action_type": "InstanceStart"});
    let (st, e) = s.call("PUT", "/actions", Some(start.clone()));
    assert_eq!(st, 400, "{e}");
    assert_eq!(s.call("GET", "/", None).1["state"], "Not started");
    let bad = dir.path().join("bad.snap");
    std::fs::write(&bad, b"not a snapshot").unwrap();
    let (st, _) = s.call("PUT", "/snapshot/load", Some(json!({"snapshot_path": bad})));
    assert_eq!(st, 400);
    assert_eq!(s.call("GET", "/", None).1["state"], "Not started");
    // Arrays are not objects.
    let (st, body) = s.raw("PUT", "/machine-config", b"[1, 64]");
    assert_eq!(st, 400);
    assert!(fault(&body).contains("expected a JSON object"), "{body}");
    // Put the drive back: the same instance starts.
    std::fs::write(&disk, vec![0u8; 1 << 16]).unwrap();
    assert_eq!(s.call("PUT", "/actions", Some(start)).0, 204);
    assert!(wait_ticks(&s, 2), "{}", s.console.text());
}

#[test]
fn firecracker_resources_rebound_lacks_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start();
    let (st, v) = s.call("GET", "/version", None);
    assert_eq!(st, 200);
    assert!(v["firecracker_version"].as_str().unwrap().starts_with("1."));
    for (method, path, body, want) in [
        (
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": {"size": 1}}}"#,
            "rate limiters",
        ),
        (
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0"}"#,
            "rate limiters",
        ),
        ("PUT", "/mmds", r#"{"a": 1}"#, "MMDS"),
        ("GET", "/mmds", "", "MMDS"),
        (
            "PUT",
            "/mmds/config",
            r#"{"network_interfaces": ["eth0"]}"#,
            "MMDS",
        ),
        (
            "PUT",
            "/vsock",
            r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#,
            "vsock",
        ),
        ("PUT", "/balloon", r#"{"amount_mib": 1}"#, "balloon"),
        ("PUT", "/logger", r#"{"log_path": "/tmp/x"}"#, "logger"),
    ] {
        let (st, text) = s.raw(method, path, body.as_bytes());
        assert_eq!(st, 400, "{method} {path}");
        let msg = fault(&text);
        assert!(msg.contains(want), "{method} {path}: {msg}");
        assert!(!msg.contains("Invalid request method"), "{msg}");
    }
    // Metrics go where Firecracker clients say, as JSON lines.
    let metrics = dir.path().join("metrics.json");
    let (st, _) = s.call("PUT", "/metrics", Some(json!({"metrics_path": metrics})));
    assert_eq!(st, 204);
    let flush = json!({"action_type": "FlushMetrics"});
    assert_eq!(s.call("PUT", "/actions", Some(flush.clone())).0, 204);
    start_ticking(&s);
    assert_eq!(s.call("PUT", "/actions", Some(flush)).0, 204);
    let lines: Vec<Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["state"], "Not started");
    assert!(lines[1]["vm"]["exits"]["io_out"].as_u64().unwrap() > 0);
}

#[test]
fn send_ctrl_alt_del_shuts_the_guest_down() {
    let s = Server::start();
    start_ticking(&s);
    let (st, e) = s.call(
        "PUT",
        "/actions",
        Some(json!({"action_type": "SendCtrlAltDel"})),
    );
    assert_eq!(st, 204, "{e}");
    let vm = s.instance.vm().unwrap();
    assert_eq!(vm.wait(), rebound_vmm::VmOutcome::Exited { status: 0 });
    assert!(s.console.text().contains("shutdown requested after"));
    assert_eq!(s.call("GET", "/", None).1["state"], "Exited");
}

#[test]
fn a_snapshot_load_reopens_its_drive_or_an_override() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let s = Server::start();
    let drive = json!({"drive_id": "rootfs", "path_on_host": disk, "is_root_device": true});
    assert_eq!(s.call("PUT", "/drives/rootfs", Some(drive)).0, 204);
    start_ticking(&s);
    let snap = dir.path().join("vm.snap");
    let create = json!({"snapshot_path": snap, "mem_file_path": dir.path().join("mem")});
    assert_eq!(s.call("PUT", "/snapshot/create", Some(create)).0, 204);
    // As Firecracker clients send it: the drive comes back from its saved path, once the VM
    // that writes it is gone (a disk file has one writer at a time).
    let t = Server::start();
    let load = json!({"snapshot_path": snap, "mem_backend": {"backend_type": "File", "backend_path": dir.path().join("mem")}, "resume_vm": true, "network_overrides": []});
    let (st, e) = t.call("PUT", "/snapshot/load", Some(load.clone()));
    assert_eq!(st, 400, "{e}");
    assert!(
        e["fault_message"]
            .as_str()
            .unwrap()
            .contains("in use by another VM"),
        "{e}"
    );
    assert_eq!(t.call("GET", "/", None).1["state"], "Not started");
    drop(s);
    let (st, e) = t.call("PUT", "/snapshot/load", Some(load));
    assert_eq!(st, 204, "{e}");
    assert!(wait_ticks(&t, 1));
    // Or from another path, of the same size.
    let other = dir.path().join("other.img");
    std::fs::copy(&disk, &other).unwrap();
    let u = Server::start();
    let load = json!({"snapshot_path": snap, "drive_overrides": [{"drive_id": "rootfs", "path_on_host": other}]});
    assert_eq!(u.call("PUT", "/snapshot/load", Some(load)).0, 204);
    // Firecracker's network_overrides name interfaces the snapshot must have.
    let v = Server::start();
    let load = json!({"snapshot_path": snap, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap0"}]});
    let (st, e) = v.call("PUT", "/snapshot/load", Some(load));
    assert_eq!(st, 400);
    assert!(e["fault_message"].as_str().unwrap().contains("eth0"), "{e}");
    assert_eq!(v.call("GET", "/", None).1["state"], "Not started");
    // A saved drive that is gone is named.
    std::fs::remove_file(&disk).unwrap();
    let w = Server::start();
    let (st, e) = w.call(
        "PUT",
        "/snapshot/load",
        Some(json!({"snapshot_path": snap})),
    );
    assert_eq!(st, 400);
    assert!(
        e["fault_message"].as_str().unwrap().contains("disk.img"),
        "{e}"
    );
    assert_eq!(w.call("GET", "/", None).1["state"], "Not started");
}

#[test]
fn a_refused_state_directory_creates_nothing() {
    // A directory on a disk, not tmpfs (the test's working directory is the crate's).
    let base = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let s = Server::start();
    let c = std::ffi::CString::new(base.path().as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs reads a NUL-terminated path into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
    if st.f_type as i64 != 0x0102_1994 {
        let want = base.path().join("x").join("sub");
        let (st, e) = s.call("PUT", "/state-dir", Some(json!({"path": want})));
        assert_eq!(st, 400);
        assert!(
            e["fault_message"]
                .as_str()
                .unwrap()
                .contains("not on tmpfs"),
            "{e}"
        );
        assert!(!base.path().join("x").exists(), "nothing was created");
    }
    let (st, e) = s.call("PUT", "/state-dir", Some(json!({"path": "relative/vm"})));
    assert_eq!(st, 400);
    assert!(
        e["fault_message"].as_str().unwrap().contains("absolute"),
        "{e}"
    );
    assert!(!std::path::Path::new("relative").exists());
    // A host CPU that does not exist is not marked failed.
    let (st, e) = s.call("PUT", "/faults", Some(json!({"cpu": 4000, "failed": true})));
    assert_eq!(st, 400);
    assert!(
        e["fault_message"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{e}"
    );
}

#[test]
fn a_running_drive_reports_its_legs_and_takes_a_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![7u8; 3 << 20]).unwrap();
    let s = Server::start();
    assert_eq!(s.call("GET", "/drives/rootfs", None).0, 400, "no VM yet");
    let drive = json!({"drive_id": "rootfs", "path_on_host": disk, "is_root_device": true});
    assert_eq!(s.call("PUT", "/drives/rootfs", Some(drive)).0, 204);
    start_ticking(&s);
    let (st, v) = s.call("GET", "/drives/rootfs", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["legs"].as_array().unwrap().len(), 1);
    assert_eq!(v["legs"][0]["state"], "healthy");
    let mirror = dir.path().join("mirror.img");
    let bad = json!({"drive_id": "other", "mirror_path": mirror});
    assert_eq!(s.call("PATCH", "/drives/rootfs", Some(bad)).0, 400);
    let patch = json!({"drive_id": "rootfs", "mirror_path": mirror});
    assert_eq!(s.call("PATCH", "/drives/rootfs", Some(patch)).0, 204);
    let t0 = Instant::now();
    loop {
        let (_, v) = s.call("GET", "/drives/rootfs", None);
        if v["legs"][1]["state"] == "healthy" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "never in sync: {v}");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(std::fs::read(&mirror).unwrap() == std::fs::read(&disk).unwrap());
    // Neither leg failed: a third file has no place.
    let third = json!({"drive_id": "rootfs", "mirror_path": dir.path().join("third.img")});
    let (st, e) = s.call("PATCH", "/drives/rootfs", Some(third));
    assert_eq!(st, 400);
    assert!(
        e["fault_message"]
            .as_str()
            .unwrap()
            .contains("neither has failed"),
        "{e}"
    );
    assert!(
        !dir.path().join("third.img").exists(),
        "a refusal creates nothing"
    );
}

#[test]
fn memory_target_reclaims_through_the_guest_and_is_shown() {
    let s = Server::start();
    let cfg = json!({"vcpu_count": 1, "mem_size_mib": 128});
    assert_eq!(s.call("PUT", "/machine-config", Some(cfg)).0, 204);
    // Before start: nothing to target.
    assert_eq!(
        s.call("PUT", "/memory", Some(json!({"target_mib": 32}))).0,
        400
    );
    let boot = json!({"kernel_image_path": "bundled:testguest", "boot_args": "memhold 8 16 8"});
    assert_eq!(s.call("PUT", "/boot-source", Some(boot)).0, 204);
    let start = json!({"action_type": "InstanceStart"});
    assert_eq!(s.call("PUT", "/actions", Some(start)).0, 204);
    let t0 = Instant::now();
    while !s.console.text().contains("memhold ready") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{}",
            s.console.text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (st, v) = s.call("GET", "/memory", None);
    assert_eq!(st, 200);
    assert_eq!(v["vm"]["cache_pages"], 16 * 256);
    let resident = v["vm"]["resident_pages"].as_u64().unwrap();
    // Bad targets are refused with the field named.
    let (st, e) = s.raw("PUT", "/memory", br#"{"target_mib": 0}"#);
    assert_eq!(st, 400);
    assert!(e.contains("target_mib"), "{e}");
    let (st, e) = s.call("PUT", "/memory", Some(json!({"target_mib": 99999})));
    assert_eq!(st, 400);
    assert!(
        e["fault_message"].as_str().unwrap().contains("target_mib"),
        "{e}"
    );
    assert_eq!(
        s.raw("PUT", "/memory", br#"{"target_mib": 8, "nope": 1}"#)
            .0,
        400
    );
    // 12 MiB less: the guest drops cache to answer.
    let target = (resident / 256).saturating_sub(12);
    assert_eq!(
        s.call("PUT", "/memory", Some(json!({"target_mib": target})))
            .0,
        204
    );
    let t0 = Instant::now();
    loop {
        let (_, v) = s.call("GET", "/memory", None);
        if v["stats"]["reached"].as_u64() >= Some(1) {
            assert!(
                v["vm"]["resident_pages"].as_u64().unwrap() <= target * 256 + 64,
                "{v}"
            );
            assert!(v["stats"]["answered"].as_u64() >= Some(1), "{v}");
            assert!(v["given_pages"].as_u64() >= Some(12 * 256 - 64), "{v}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{v}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The metrics carry the class counters and the swap.
    let (_, m) = s.call("GET", "/metrics", None);
    assert!(
        m["memory"]["counters"]["returned_pages"].as_u64() >= Some(12 * 256 - 64),
        "{m}"
    );
}
