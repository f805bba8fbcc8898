//! The audit trail: one JSON line per brokered connection, denial and refusal.
//!
//! Schema version 1 (`"v": 1`), documented in docs/audit.md. Records name the store and the
//! secret *references* a policy uses — never a value. Writing happens on a task of its own so
//! the data path never waits on the disk; if the queue is full the record is dropped and counted.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::{
    config::{Credentials, Policy, SecretRef},
    identity::Workload,
};

pub const SCHEMA_VERSION: u32 = 1;

/// What happened to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Brokered and relayed until one side closed.
    Relayed,
    /// A policy applied, but brokering failed (store, target, authentication…).
    Failed,
    /// The policy does not admit this workload.
    Denied,
    /// Not redirected by the kernel, or no policy covers it.
    Refused,
    /// Matched a policy but went to its destination without latch (fail mode `open`, from a
    /// network namespace latch did not listen in yet).
    Bypassed,
}

/// One audit line.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub v: u32,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub conn: u64,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Shared with the other live connections of an equal identity (`identity::seen`).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "shared_workload"
    )]
    pub workload: Option<std::sync::Arc<Workload>>,
    /// Where the application was connecting (or the broker's address, for refusals).
    pub destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    /// Secret references the policy uses, as `store:path[#field][@version]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    pub bytes_to_target: u64,
    pub bytes_to_app: u64,
    /// The kernel carried the application-to-target bytes after the handshake.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fast_path: bool,
    /// Direct mode: after latch's startup the session was the application's own connection
    /// (no byte counts after the hand-over).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub direct: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_ms: Option<f64>,
    pub duration_ms: f64,
    /// Refusal and denial records of this workload not written since its previous one (see
    /// [`crate::audit_limit`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
    /// A summary of a storm of refusals: how many, in the last second, had `reason` (see
    /// [`crate::refusals`]); `conn` is 0 and `destination` empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// Serializes the shared workload as the workload itself.
fn shared_workload<S: serde::Serializer>(
    w: &Option<std::sync::Arc<Workload>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&w.as_deref(), s)
}

impl Record {
    /// A record with the fields every event has; the rest start empty.
    pub fn new(conn: u64, outcome: Outcome, destination: String) -> Self {
        Self {
            v: SCHEMA_VERSION,
            time: rfc3339(SystemTime::now()),
            conn,
            outcome,
            reason: None,
            workload: None,
            destination,
            policy: None,
            protocol: None,
            secrets: Vec::new(),
            bytes_to_target: 0,
            bytes_to_app: 0,
            fast_path: false,
            direct: false,
            handshake_ms: None,
            duration_ms: 0.0,
            suppressed: None,
            count: None,
        }
    }

    /// Fills the policy, protocol and secret references from `policy`.
    pub fn with_policy(mut self, policy: &Policy) -> Self {
        self.policy = Some(policy.name.clone());
        self.protocol = Some(policy.protocol.as_str());
        self.secrets = secret_refs(policy);
        self
    }
}

/// The secret references of a policy, formatted for the audit trail.
pub fn secret_refs(policy: &Policy) -> Vec<String> {
    let fmt = |r: &SecretRef| {
        let mut s = format!("{}:{}", r.store, r.path);
        if let Some(f) = &r.field {
            s.push('#');
            s.push_str(f);
        }
        if let Some(v) = &r.version {
            s.push('@');
            s.push_str(v);
        }
        s
    };
    let mut out = Vec::new();
    for block in policy.credential_blocks() {
        match block {
            Credentials::Static {
                username, password, ..
            } => out.extend([username, password].into_iter().flatten().map(&fmt)),
            Credentials::Dynamic { store, path } => out.push(format!("{store}:{path}")),
        }
    }
    out
}

/// Where audit lines go.
#[derive(Debug, Clone, Default)]
pub struct AuditOptions {
    pub file: Option<PathBuf>,
    /// Rotate the file when it grows past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.jsonl.1` … `.N`).
    pub keep: u32,
    pub stdout: bool,
}

/// Handle the data path uses to record events. Cheap to clone.
///
/// Records of connections latch brokered or tried to (relayed, failed, bypassed) are never
/// dropped: when the writer falls behind, recording waits for room (the disk slows the data
/// path rather than lose them). Refusals and denials are rate-limited per workload instead
/// (the next record written says how many were not), and dropped only if the queue is full.
#[derive(Clone)]
pub struct Audit {
    tx: Option<std::sync::mpsc::SyncSender<String>>,
    dropped: Arc<AtomicU64>,
    limiter: Arc<std::sync::Mutex<crate::audit_limit::Limiter>>,
}

/// Lines the writer's queue holds.
const QUEUE: usize = 4096;

impl Audit {
    /// Records go nowhere.
    pub fn disabled() -> Self {
        Self {
            tx: None,
            dropped: Arc::default(),
            limiter: Arc::default(),
        }
    }

    /// Starts the writer task (on the current tokio runtime).
    pub fn start(opts: AuditOptions) -> std::io::Result<Self> {
        Self::start_with_queue(opts, QUEUE)
    }

    fn start_with_queue(opts: AuditOptions, queue: usize) -> std::io::Result<Self> {
        if opts.file.is_none() && !opts.stdout {
            return Ok(Self::disabled());
        }
        let mut writer = Writer::open(&opts)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(queue);
        std::thread::Builder::new()
            .name("latch-audit".into())
            .spawn(move || {
                for line in rx {
                    if let Err(err) = writer.write(&line) {
                        tracing::error!(%err, "writing the audit log failed");
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            dropped: Arc::default(),
            limiter: Arc::default(),
        })
    }

    pub fn record(&self, record: &Record) {
        let Some(tx) = &self.tx else { return };
        let must_keep = matches!(
            record.outcome,
            Outcome::Relayed | Outcome::Failed | Outcome::Bypassed
        );
        let mut suppressed = None;
        if !must_keep {
            let key = record
                .workload
                .as_ref()
                .and_then(|w| w.cgroup.clone())
                .unwrap_or_default();
            let allowed = self
                .limiter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .allow(&key, std::time::Instant::now());
            match allowed {
                Some(0) => {}
                Some(n) => suppressed = Some(n),
                None => return,
            }
        }
        let line = if suppressed.is_some() {
            let mut r = record.clone();
            r.suppressed = suppressed;
            serde_json::to_string(&r)
        } else {
            serde_json::to_string(record)
        };
        let Ok(mut line) = line else { return };
        line.push('\n');
        if must_keep {
            // Waits while the queue is full; fails only if the writer is gone.
            if tx.send(line).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        } else if tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes the record of a session another agent began (an upgrade handed it over), as
    /// that agent serialized it with the counts brought up to date: kept like a relayed one.
    pub fn record_value(&self, record: &serde_json::Value) {
        let Some(tx) = &self.tx else { return };
        let Ok(mut line) = serde_json::to_string(record) else {
            return;
        };
        line.push('\n');
        if tx.send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes a summary record (at most one per refusal reason a second): not subject to the
    /// per-workload limit, dropped only if the queue is full.
    pub fn summary(&self, record: &Record) {
        let Some(tx) = &self.tx else { return };
        let Ok(mut line) = serde_json::to_string(record) else {
            return;
        };
        line.push('\n');
        if tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records lost because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

struct Writer {
    file: Option<(PathBuf, std::fs::File, u64)>,
    max_bytes: u64,
    keep: u32,
    stdout: bool,
}

impl Writer {
    fn open(opts: &AuditOptions) -> std::io::Result<Self> {
        let file = match &opts.file {
            Some(path) => {
                let f = open_append(path)?;
                let len = f.metadata()?.len();
                Some((path.clone(), f, len))
            }
            None => None,
        };
        Ok(Self {
            file,
            max_bytes: if opts.max_bytes == 0 {
                100 << 20
            } else {
                opts.max_bytes
            },
            keep: opts.keep.max(1),
            stdout: opts.stdout,
        })
    }

    fn write(&mut self, line: &str) -> std::io::Result<()> {
        if self.stdout {
            let mut out = std::io::stdout().lock();
            out.write_all(line.as_bytes())?;
            out.flush()?;
        }
        let Some((path, file, len)) = &mut self.file else {
            return Ok(());
        };
        if *len > 0 && *len + line.len() as u64 > self.max_bytes {
            rotate(path, self.keep)?;
            *file = open_append(path)?;
            *len = 0;
        }
        file.write_all(line.as_bytes())?;
        *len += line.len() as u64;
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// `audit.jsonl` → `.1`, `.1` → `.2`, … dropping what falls past `keep`.
fn rotate(path: &Path, keep: u32) -> std::io::Result<()> {
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    let _ = std::fs::remove_file(numbered(keep));
    for n in (1..keep).rev() {
        let _ = std::fs::rename(numbered(n), numbered(n + 1));
    }
    std::fs::rename(path, numbered(1))
}

/// Formats a time as RFC 3339 UTC with milliseconds, e.g. `2026-11-23T13:20:23.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, dd) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's method).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trail(tag: &str, queue: usize) -> (Audit, PathBuf) {
        let file =
            std::env::temp_dir().join(format!("latch-audit-{tag}-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&file);
        let opts = AuditOptions {
            file: Some(file.clone()),
            max_bytes: 1 << 30,
            keep: 1,
            stdout: false,
        };
        (Audit::start_with_queue(opts, queue).unwrap(), file)
    }

    fn lines_eventually(file: &Path, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lines: Vec<String> = std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect();
            if lines.len() >= n || std::time::Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn relayed_and_failed_records_are_never_dropped_when_the_writer_falls_behind() {
        // A queue of one line: the writer is behind almost all the time.
        let (audit, file) = trail("keep", 1);
        for i in 0..3000 {
            let outcome = if i % 2 == 0 {
                Outcome::Relayed
            } else {
                Outcome::Failed
            };
            audit.record(&Record::new(i, outcome, "10.0.0.1:5432".into()));
        }
        let lines = lines_eventually(&file, 3000);
        assert_eq!(lines.len(), 3000);
        assert_eq!(audit.dropped(), 0);
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn refusals_are_rate_limited_per_workload_and_the_next_record_says_how_many() {
        let (audit, file) = trail("limit", QUEUE);
        let refused = |cgroup: &str| {
            let mut r = Record::new(1, Outcome::Refused, "127.0.0.1:951".into());
            r.workload = Some(
                Workload {
                    cgroup: Some(cgroup.into()),
                    ..Default::default()
                }
                .into(),
            );
            r
        };
        for _ in 0..1000 {
            audit.record(&refused("/flood"));
        }
        audit.record(&refused("/quiet"));
        audit.record(&Record::new(2, Outcome::Relayed, "10.0.0.1:5432".into()));
        let want = crate::audit_limit::BURST as usize + 2;
        let lines = lines_eventually(&file, want);
        assert_eq!(lines.len(), want, "{lines:#?}");
        assert!(lines.iter().any(|l| l.contains("\"/quiet\"")));
        assert!(lines.last().unwrap().contains("\"relayed\""));
        // Once the bucket refills, the next record carries the count.
        std::thread::sleep(Duration::from_millis(150));
        audit.record(&refused("/flood"));
        let lines = lines_eventually(&file, want + 1);
        let last = lines.last().unwrap();
        assert!(
            last.contains(&format!(
                "\"suppressed\":{}",
                1000 - crate::audit_limit::BURST as usize
            )),
            "{last}"
        );
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn formats_rfc3339() {
        // `date -u -d @1795440023` says Mon Nov 23 13:20:23 UTC 2026.
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_440_023_123);
        assert_eq!(rfc3339(t), "2026-11-23T13:20:23.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&rfc3339(leap)[..10], "2000-02-29");
    }

    #[test]
    fn rotation_keeps_the_newest_files() {
        let dir = std::env::temp_dir().join(format!("latch-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("audit.jsonl");
        let mut w = Writer::open(&AuditOptions {
            file: Some(path.clone()),
            max_bytes: 20,
            keep: 2,
            stdout: false,
        })
        .unwrap();
        for i in 0..5 {
            w.write(&format!("{{\"n\":{i:09}}}\n")).unwrap(); // 16 bytes each
        }
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("000000004")
        );
        assert!(
            std::fs::read_to_string(dir.join("audit.jsonl.1"))
                .unwrap()
                .contains("000000003")
        );
        assert!(
            std::fs::read_to_string(dir.join("audit.jsonl.2"))
                .unwrap()
                .contains("000000002")
        );
        assert!(!dir.join("audit.jsonl.3").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
