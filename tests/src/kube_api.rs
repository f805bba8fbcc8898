//! A Kubernetes API server for tests, on loopback in the test process: it serves pods the way
//! kube-apiserver does to a client that lists and watches them (the calls kube-runtime's
//! watcher makes), with objects built from `k8s-openapi`'s types (the upstream OpenAPI
//! definitions), so their JSON has the real shapes.
//!
//! - `GET /api/v1/pods?fieldSelector=spec.nodeName%3DNODE`: a `PodList` with
//!   `metadata.resourceVersion`;
//! - `...&watch=true&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=N`: a
//!   chunked stream of watch events (`ADDED`, `MODIFIED`, `DELETED`, and `BOOKMARK` every
//!   second while idle) after RV; an RV older than the compacted history gets the `ERROR`
//!   event with a 410 `Status` (reason `Expired`), as the real server sends it;
//! - latch's custom resources the same way (`GET /apis/latch.dev/v1alpha1/{policies,
//!   clusterpolicies,secretstores}`, list and watch across namespaces), and the merge
//!   `PATCH` of their `status` subresource (`.../namespaces/NS/PLURAL/NAME/status`, or
//!   `.../PLURAL/NAME/status` for cluster-scoped ones), which changes only `.status`;
//! - `GET /api/v1/namespaces/NS/secrets/NAME`: Secrets the test put;
//! - a bearer token is required (401 `Status` otherwise).
//!
//! [`KubeApi::start_tls`] puts `socat` in front as the TLS server (a certificate for
//! 127.0.0.1 from [`crate::certs::TestCa`]; the kubeconfig names the CA), so the agent's
//! client verifies the server as it does a real one. [`KubeApi::restart`] drops every connection and stops answering for a while, then listens
//! on the same port again, like an API server restart.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Container, Pod, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Status},
};

/// The token the agent must present.
pub const TOKEN: &str = "latch-test-token";

/// A pod as the test describes it.
#[derive(Debug, Clone)]
pub struct PodSpecT {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
}

struct Store {
    rv: u64,
    /// Events at or below this resourceVersion are compacted away: watches from older ones
    /// get 410 Gone.
    compacted: u64,
    pods: BTreeMap<String, (u64, PodSpecT)>,
    /// Custom resources by (plural, namespace, name): (resourceVersion, object).
    objects: BTreeMap<(String, Option<String>, String), (u64, serde_json::Value)>,
    /// Secrets by (namespace, name): their `data` (plain values; served base64).
    secrets: BTreeMap<(String, String), BTreeMap<String, String>>,
    /// (resourceVersion, type, collection, object) of every change, oldest first; the
    /// collection is `pods` or a custom resource's plural.
    events: Vec<(u64, &'static str, String, serde_json::Value)>,
}

struct Inner {
    store: Mutex<Store>,
    changed: Condvar,
    /// Incremented to end every open connection (restart).
    epoch: AtomicU64,
    /// Incremented when the history is compacted: open watches get 410 Gone.
    compactions: AtomicU64,
    down: AtomicBool,
    stop: AtomicBool,
    lists: AtomicU64,
    watches: AtomicU64,
    gone: AtomicU64,
    field_selectors: Mutex<Vec<String>>,
    status_patches: AtomicU64,
    /// `namespace/name` of every Secret read.
    secret_reads: Mutex<Vec<String>>,
}

pub struct KubeApi {
    /// The plain HTTP listener.
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    acceptor: Option<thread::JoinHandle<()>>,
    tls: Option<Tls>,
}

/// The TLS front: socat terminating TLS for the plain listener.
struct Tls {
    addr: SocketAddr,
    ca: crate::certs::TestCa,
    _socat: crate::Killed,
}

impl KubeApi {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the test API server");
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            store: Mutex::new(Store {
                rv: 100,
                compacted: 0,
                pods: BTreeMap::new(),
                objects: BTreeMap::new(),
                secrets: BTreeMap::new(),
                events: Vec::new(),
            }),
            changed: Condvar::new(),
            epoch: AtomicU64::new(0),
            compactions: AtomicU64::new(0),
            down: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            lists: AtomicU64::new(0),
            watches: AtomicU64::new(0),
            gone: AtomicU64::new(0),
            field_selectors: Mutex::new(Vec::new()),
            status_patches: AtomicU64::new(0),
            secret_reads: Mutex::new(Vec::new()),
        });
        let acceptor = Some(spawn_acceptor(listener, inner.clone()));
        KubeApi {
            addr,
            inner,
            acceptor,
            tls: None,
        }
    }

    /// Like [`KubeApi::start`], served over TLS (see the module documentation).
    pub fn start_tls() -> Self {
        let mut api = Self::start();
        let ca = crate::certs::TestCa::new("kube-apiserver", &["IP:127.0.0.1"]);
        let port = crate::servers::free_port("127.0.0.1");
        let socat = crate::bins::tool("socat", "the Debian package socat");
        let child = std::process::Command::new(socat)
            .arg(format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
                ca.server_cert().display(),
                ca.server_key().display()
            ))
            .arg(format!("TCP:{}", api.addr))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start socat");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let up = crate::eventually(Duration::from_secs(10), || TcpStream::connect(addr).is_ok());
        assert!(up, "socat never listened on {addr}");
        api.tls = Some(Tls {
            addr,
            ca,
            _socat: crate::Killed(child),
        });
        api
    }

    /// The URL clients use (the TLS front if any).
    pub fn url(&self) -> String {
        match &self.tls {
            Some(t) => format!("https://{}", t.addr),
            None => format!("http://{}", self.addr),
        }
    }

    /// The CA file of the TLS front, if any.
    pub fn ca_file(&self) -> Option<std::path::PathBuf> {
        self.tls.as_ref().map(|t| t.ca.ca())
    }

    /// A kubeconfig pointing at this server (its TLS front if any) with [`TOKEN`].
    pub fn kubeconfig(&self) -> String {
        let cluster = match &self.tls {
            Some(t) => format!(
                "    server: https://{}\n    certificate-authority: {}\n",
                t.addr,
                t.ca.ca().display()
            ),
            None => format!("    server: http://{}\n", self.addr),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n{cluster}\
             users:\n- name: latch\n  user:\n    token: {TOKEN}\ncontexts:\n- name: test\n  context:\n    \
             cluster: test\n    user: latch\ncurrent-context: test\n"
        )
    }

    /// Adds a pod, or replaces it (a `MODIFIED` event) if its UID exists.
    pub fn put_pod(&self, pod: &PodSpecT) {
        let mut s = self.inner.store.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let kind = if s.pods.contains_key(&pod.uid) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.pods.insert(pod.uid.clone(), (rv, pod.clone()));
        s.events.push((rv, kind, "pods".into(), pod_json(pod, rv)));
        self.inner.changed.notify_all();
    }

    /// Changes a pod's labels (`MODIFIED`).
    pub fn set_labels(&self, uid: &str, labels: &[(&str, &str)]) {
        let mut pod = self.pod(uid).expect("no such pod");
        pod.labels = labels_of(labels);
        self.put_pod(&pod);
    }

    pub fn pod(&self, uid: &str) -> Option<PodSpecT> {
        self.inner
            .store
            .lock()
            .unwrap()
            .pods
            .get(uid)
            .map(|(_, p)| p.clone())
    }

    /// Deletes a pod (`DELETED`, with the object's last state and a new resourceVersion).
    pub fn delete_pod(&self, uid: &str) {
        let mut s = self.inner.store.lock().unwrap();
        let Some((_, pod)) = s.pods.remove(uid) else {
            return;
        };
        s.rv += 1;
        let rv = s.rv;
        s.events
            .push((rv, "DELETED", "pods".into(), pod_json(&pod, rv)));
        self.inner.changed.notify_all();
    }

    /// Creates or replaces (keeping its `status`) the custom resource `kind` (`Policy`,
    /// `ClusterPolicy`, `SecretStore`) `namespace/name` with `spec`; its `generation` grows
    /// with each spec change, as the real server counts it.
    pub fn put_resource(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        spec: serde_json::Value,
    ) {
        let plural = plural_of(kind);
        let mut s = self.inner.store.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let key = (
            plural.to_owned(),
            namespace.map(str::to_owned),
            name.to_owned(),
        );
        let (event, mut obj) = match s.objects.get(&key) {
            Some((_, old)) => ("MODIFIED", old.clone()),
            None => {
                let mut meta =
                    serde_json::json!({"name": name, "uid": format!("uid-{rv}"), "generation": 0});
                if let Some(ns) = namespace {
                    meta["namespace"] = ns.into();
                }
                (
                    "ADDED",
                    serde_json::json!({"apiVersion": "latch.dev/v1alpha1", "kind": kind, "metadata": meta}),
                )
            }
        };
        obj["spec"] = spec;
        obj["metadata"]["generation"] =
            (obj["metadata"]["generation"].as_i64().unwrap_or(0) + 1).into();
        obj["metadata"]["resourceVersion"] = rv.to_string().into();
        s.objects.insert(key, (rv, obj.clone()));
        s.events.push((rv, event, plural.to_owned(), obj));
        self.inner.changed.notify_all();
    }

    /// Deletes a custom resource (`DELETED`).
    pub fn delete_resource(&self, kind: &str, namespace: Option<&str>, name: &str) {
        let plural = plural_of(kind);
        let mut s = self.inner.store.lock().unwrap();
        let key = (
            plural.to_owned(),
            namespace.map(str::to_owned),
            name.to_owned(),
        );
        let Some((_, mut obj)) = s.objects.remove(&key) else {
            return;
        };
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = rv.to_string().into();
        s.events.push((rv, "DELETED", plural.to_owned(), obj));
        self.inner.changed.notify_all();
    }

    /// A custom resource as stored now.
    pub fn resource(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<serde_json::Value> {
        let key = (
            plural_of(kind).to_owned(),
            namespace.map(str::to_owned),
            name.to_owned(),
        );
        self.inner
            .store
            .lock()
            .unwrap()
            .objects
            .get(&key)
            .map(|(_, o)| o.clone())
    }

    /// The `Accepted` condition of a custom resource: (status, reason, message).
    pub fn accepted(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<(String, String, String)> {
        let obj = self.resource(kind, namespace, name)?;
        let c = obj["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Accepted")?
            .clone();
        let s = |f: &str| c[f].as_str().unwrap_or_default().to_owned();
        Some((s("status"), s("reason"), s("message")))
    }

    /// Status PATCHes served so far.
    pub fn status_patches(&self) -> u64 {
        self.inner.status_patches.load(Ordering::SeqCst)
    }

    /// Adds a Secret `namespace/name` with `data`.
    pub fn put_secret(&self, namespace: &str, name: &str, data: &[(&str, &str)]) {
        self.inner.store.lock().unwrap().secrets.insert(
            (namespace.to_owned(), name.to_owned()),
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
    }

    /// `namespace/name` of every Secret read so far.
    pub fn secret_reads(&self) -> Vec<String> {
        self.inner.secret_reads.lock().unwrap().clone()
    }

    /// Compacts the history (every resourceVersion so far expires): open watches end with
    /// the `ERROR` event carrying a 410 Gone `Status`, as kube-apiserver ends a watch whose
    /// resourceVersion its watch cache no longer holds, and a watch from an old
    /// resourceVersion gets the same. The client must list again. Changes made while `during`
    /// runs are compacted too, so only a list shows them.
    pub fn expire_history(&self, during: impl FnOnce()) {
        {
            let mut s = self.inner.store.lock().unwrap();
            s.compacted = s.rv;
            s.events.clear();
        }
        self.inner.compactions.fetch_add(1, Ordering::SeqCst);
        self.inner.changed.notify_all();
        during();
        let mut s = self.inner.store.lock().unwrap();
        s.compacted = s.rv;
        s.events.clear();
    }

    /// Like an API server restart: stops listening and drops every open connection (watches
    /// end mid-stream), runs `during`, waits `down`, then serves again on the same address. The history survives, as etcd's
    /// does across an API server restart.
    pub fn restart(&mut self, down: Duration, during: impl FnOnce()) {
        self.inner.down.store(true, Ordering::SeqCst);
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.epoch.fetch_add(1, Ordering::SeqCst);
        self.inner.changed.notify_all();
        if let Some(a) = self.acceptor.take() {
            a.join().unwrap();
        }
        during();
        thread::sleep(down);
        self.inner.stop.store(false, Ordering::SeqCst);
        self.inner.down.store(false, Ordering::SeqCst);
        let listener = TcpListener::bind(self.addr).expect("bind the test API server again");
        self.acceptor = Some(spawn_acceptor(listener, self.inner.clone()));
    }

    /// LIST requests served so far.
    pub fn lists(&self) -> u64 {
        self.inner.lists.load(Ordering::SeqCst)
    }

    /// WATCH requests served so far.
    pub fn watches(&self) -> u64 {
        self.inner.watches.load(Ordering::SeqCst)
    }

    /// Watches answered with 410 Gone so far.
    pub fn gone(&self) -> u64 {
        self.inner.gone.load(Ordering::SeqCst)
    }

    /// The field selectors of the requests so far.
    pub fn field_selectors(&self) -> Vec<String> {
        self.inner.field_selectors.lock().unwrap().clone()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.epoch.fetch_add(1, Ordering::SeqCst);
        self.inner.changed.notify_all();
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// Labels from pairs.
pub fn labels_of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The pod as kube-apiserver serves it (built from k8s-openapi's `Pod`).
pub fn pod_json(p: &PodSpecT, rv: u64) -> serde_json::Value {
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(p.name.clone()),
            namespace: Some(p.namespace.clone()),
            uid: Some(p.uid.clone()),
            resource_version: Some(rv.to_string()),
            labels: Some(p.labels.clone()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(p.node.clone()),
            service_account_name: Some(p.service_account.clone()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.example/app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        }),
    };
    serde_json::to_value(&pod).unwrap()
}

fn status_json(code: u16, reason: &str, message: &str) -> serde_json::Value {
    let status = Status {
        code: Some(code.into()),
        reason: Some(reason.into()),
        message: Some(message.into()),
        status: Some("Failure".into()),
        ..Default::default()
    };
    let mut v = serde_json::to_value(&status).unwrap();
    v["apiVersion"] = "v1".into();
    v["kind"] = "Status".into();
    v
}

fn spawn_acceptor(listener: TcpListener, inner: Arc<Inner>) -> thread::JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        while !inner.stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let inner = inner.clone();
                    thread::spawn(move || {
                        let _ = serve(stream, &inner);
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    })
}

struct Request {
    method: String,
    body: Vec<u8>,
    path: String,
    query: BTreeMap<String, String>,
    token: Option<String>,
}

fn read_request(stream: &TcpStream) -> std::io::Result<Option<Request>> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let method = line.split_whitespace().next().unwrap_or("GET").to_owned();
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut token = None;
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            if name.eq_ignore_ascii_case("authorization") {
                token = value.trim().strip_prefix("Bearer ").map(str::to_owned);
            } else if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0).min(1 << 20);
            }
        }
    }
    let mut body = vec![0; length];
    std::io::Read::read_exact(&mut reader, &mut body)?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    Ok(Some(Request {
        method,
        body,
        path: path.to_owned(),
        query,
        token,
    }))
}

/// Percent-decoding (and `+` as space) of a query component.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(mut stream: &TcpStream, code: u16, body: &serde_json::Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).unwrap();
    let reason = match code {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Error",
    };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()
}

fn chunk(mut stream: &TcpStream, value: &serde_json::Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).unwrap();
    line.push(b'\n');
    write!(stream, "{:x}\r\n", line.len())?;
    stream.write_all(&line)?;
    stream.write_all(b"\r\n")?;
    stream.flush()
}

/// The node a `spec.nodeName=NODE` field selector names (`None`: every pod). Other
/// selectors are refused (400), as the real server refuses fields it does not index.
fn node_selector(query: &BTreeMap<String, String>) -> Result<Option<String>, String> {
    match query.get("fieldSelector").map(String::as_str) {
        None | Some("") => Ok(None),
        Some(sel) => match sel.strip_prefix("spec.nodeName=") {
            Some(node) => Ok(Some(node.to_owned())),
            None => Err(format!("field label not supported: {sel}")),
        },
    }
}

fn on_node(node: &Option<String>, pod: &serde_json::Value) -> bool {
    node.as_deref()
        .is_none_or(|n| pod["spec"]["nodeName"].as_str() == Some(n))
}

fn serve(stream: TcpStream, inner: &Inner) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let epoch = inner.epoch.load(Ordering::SeqCst);
    let compactions = inner.compactions.load(Ordering::SeqCst);
    let Some(req) = read_request(&stream)? else {
        return Ok(());
    };
    if inner.down.load(Ordering::SeqCst) {
        return Ok(());
    }
    if req.token.as_deref() != Some(TOKEN) {
        return respond(
            &stream,
            401,
            &status_json(401, "Unauthorized", "Unauthorized"),
        );
    }
    if let Some(rest) = req.path.strip_prefix("/api/v1/namespaces/")
        && let [ns, "secrets", name] = rest.split('/').collect::<Vec<_>>()[..]
    {
        return serve_secret(&stream, inner, ns, name);
    }
    let collection = if req.path == "/api/v1/pods" {
        "pods".to_owned()
    } else if let Some(rest) = req.path.strip_prefix("/apis/latch.dev/v1alpha1/") {
        let parts: Vec<&str> = rest.split('/').collect();
        match parts[..] {
            [plural] if PLURALS.contains(&plural) => plural.to_owned(),
            ["namespaces", ns, plural, name, "status"] if req.method == "PATCH" => {
                return patch_status(&stream, inner, plural, Some(ns), name, &req.body);
            }
            [plural, name, "status"] if req.method == "PATCH" => {
                return patch_status(&stream, inner, plural, None, name, &req.body);
            }
            _ => String::new(),
        }
    } else {
        String::new()
    };
    if collection.is_empty() {
        return respond(
            &stream,
            404,
            &status_json(
                404,
                "NotFound",
                &format!("the server could not find {}", req.path),
            ),
        );
    }
    if let Some(sel) = req.query.get("fieldSelector") {
        inner.field_selectors.lock().unwrap().push(sel.clone());
    }
    let node = match node_selector(&req.query) {
        Ok(n) => n,
        Err(msg) => return respond(&stream, 400, &status_json(400, "BadRequest", &msg)),
    };
    let watch = matches!(
        req.query.get("watch").map(String::as_str),
        Some("true" | "1")
    );
    if !watch {
        inner.lists.fetch_add(1, Ordering::SeqCst);
        let s = inner.store.lock().unwrap();
        let items: Vec<serde_json::Value> = if collection == "pods" {
            s.pods
                .values()
                .map(|(rv, p)| pod_json(p, *rv))
                .filter(|p| on_node(&node, p))
                .collect()
        } else {
            s.objects
                .iter()
                .filter(|((plural, _, _), _)| *plural == collection)
                .map(|(_, (_, o))| o.clone())
                .collect()
        };
        let (api_version, list_kind) = if collection == "pods" {
            ("v1", "PodList".to_owned())
        } else {
            (
                "latch.dev/v1alpha1",
                format!("{}List", kind_of(&collection)),
            )
        };
        let list = serde_json::json!({
            "apiVersion": api_version,
            "kind": list_kind,
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        });
        drop(s);
        return respond(&stream, 200, &list);
    }
    inner.watches.fetch_add(1, Ordering::SeqCst);
    let mut from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = req.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let mut w = &stream;
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    w.flush()?;
    let deadline = Instant::now() + timeout;
    let mut s = inner.store.lock().unwrap();
    let gone = |from: u64, compacted: u64| -> std::io::Result<()> {
        inner.gone.fetch_add(1, Ordering::SeqCst);
        let msg = format!("too old resource version: {from} ({})", compacted + 1);
        chunk(
            &stream,
            &serde_json::json!({"type": "ERROR", "object": status_json(410, "Expired", &msg)}),
        )?;
        (&stream).write_all(b"0\r\n\r\n")
    };
    if from < s.compacted {
        let compacted = s.compacted;
        drop(s);
        return gone(from, compacted);
    }
    let mut last_sent = Instant::now();
    loop {
        if inner.epoch.load(Ordering::SeqCst) != epoch || Instant::now() >= deadline {
            drop(s);
            // An ended watch: the terminating chunk (restart: just the closed connection).
            if inner.epoch.load(Ordering::SeqCst) == epoch {
                let _ = w.write_all(b"0\r\n\r\n");
            }
            return Ok(());
        }
        if inner.compactions.load(Ordering::SeqCst) != compactions {
            let compacted = s.compacted;
            drop(s);
            return gone(from, compacted);
        }
        let pending: Vec<(u64, &'static str, String, serde_json::Value)> = s
            .events
            .iter()
            .filter(|(rv, _, coll, obj)| *rv > from && *coll == collection && on_node(&node, obj))
            .cloned()
            .collect();
        // Everything up to the head has been seen (other nodes' pods are not this watch's).
        let head = s.rv;
        from = from.max(head);
        drop(s);
        for (_, kind, _, obj) in &pending {
            chunk(&stream, &serde_json::json!({"type": kind, "object": obj}))?;
            last_sent = Instant::now();
        }
        if bookmarks && last_sent.elapsed() >= Duration::from_secs(1) {
            let (api_version, kind) = if collection == "pods" {
                ("v1", "Pod")
            } else {
                ("latch.dev/v1alpha1", kind_of(&collection))
            };
            let mark = serde_json::json!({
                "type": "BOOKMARK",
                "object": {"apiVersion": api_version, "kind": kind,
                           "metadata": {"resourceVersion": head.to_string()}},
            });
            chunk(&stream, &mark)?;
            last_sent = Instant::now();
        }
        s = inner.store.lock().unwrap();
        if s.rv <= from {
            s = inner
                .changed
                .wait_timeout(s, Duration::from_millis(200))
                .unwrap()
                .0;
        }
    }
}

const PLURALS: [&str; 3] = ["policies", "clusterpolicies", "secretstores"];

fn plural_of(kind: &str) -> &'static str {
    match kind {
        "Policy" => "policies",
        "ClusterPolicy" => "clusterpolicies",
        "SecretStore" => "secretstores",
        other => panic!("not a latch kind: {other}"),
    }
}

fn kind_of(plural: &str) -> &'static str {
    match plural {
        "policies" => "Policy",
        "clusterpolicies" => "ClusterPolicy",
        _ => "SecretStore",
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match patch {
        serde_json::Value::Object(p) => {
            if !target.is_object() {
                *target = serde_json::json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// The `status` subresource: a merge patch of which only `.status` is applied (as the real
/// server ignores other changes through it); a `MODIFIED` event.
fn patch_status(
    stream: &TcpStream,
    inner: &Inner,
    plural: &str,
    namespace: Option<&str>,
    name: &str,
    body: &[u8],
) -> std::io::Result<()> {
    inner.status_patches.fetch_add(1, Ordering::SeqCst);
    let Ok(patch) = serde_json::from_slice::<serde_json::Value>(body) else {
        return respond(stream, 400, &status_json(400, "BadRequest", "not JSON"));
    };
    let mut s = inner.store.lock().unwrap();
    let key = (
        plural.to_owned(),
        namespace.map(str::to_owned),
        name.to_owned(),
    );
    let Some((_, obj)) = s.objects.get(&key).cloned() else {
        drop(s);
        return respond(
            stream,
            404,
            &status_json(404, "NotFound", &format!("{plural} {name:?} not found")),
        );
    };
    let mut obj = obj;
    let mut status = obj
        .get("status")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    merge_patch(&mut status, &patch["status"]);
    obj["status"] = status;
    s.rv += 1;
    let rv = s.rv;
    obj["metadata"]["resourceVersion"] = rv.to_string().into();
    s.objects.insert(key, (rv, obj.clone()));
    s.events
        .push((rv, "MODIFIED", plural.to_owned(), obj.clone()));
    inner.changed.notify_all();
    drop(s);
    respond(stream, 200, &obj)
}

fn serve_secret(stream: &TcpStream, inner: &Inner, ns: &str, name: &str) -> std::io::Result<()> {
    use base64::Engine as _;
    inner
        .secret_reads
        .lock()
        .unwrap()
        .push(format!("{ns}/{name}"));
    let s = inner.store.lock().unwrap();
    let Some(data) = s.secrets.get(&(ns.to_owned(), name.to_owned())).cloned() else {
        drop(s);
        return respond(
            stream,
            404,
            &status_json(404, "NotFound", &format!("secrets {name:?} not found")),
        );
    };
    drop(s);
    let data: serde_json::Map<String, serde_json::Value> = data
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                base64::engine::general_purpose::STANDARD.encode(v).into(),
            )
        })
        .collect();
    respond(
        stream,
        200,
        &serde_json::json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": ns}, "data": data}),
    )
}
