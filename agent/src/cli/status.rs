//! `latch status`: what a running agent is doing, from its admin endpoint.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

pub fn main(admin: SocketAddr, json: bool) -> anyhow::Result<ExitCode> {
    let body = get(admin, "/status")?;
    if json {
        print!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let status: Value = serde_json::from_str(&body).context("the agent's /status is not JSON")?;
    print!("{}", render(&status));
    Ok(ExitCode::SUCCESS)
}

/// A table a person reads at a glance.
fn render(s: &Value) -> String {
    let mut out = String::new();
    let c = &s["connections"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    out.push_str(&format!(
        "latch {}  {}  cgroup {}\n",
        s["version"].as_str().unwrap_or("?"),
        if s["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "NOT READY"
        },
        s["cgroup"].as_str().unwrap_or("?")
    ));
    let listeners: Vec<&str> = s["listeners"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    out.push_str(&format!("listening  {}\n", listeners.join(", ")));
    out.push_str(&format!(
        "connections  active {}  relayed {}  failed {}  denied {}  refused {}\n",
        c["active"].as_i64().unwrap_or(0),
        n(&c["relayed"]),
        n(&c["failed"]),
        n(&c["denied"]),
        n(&c["refused"])
    ));
    let d = &s["descriptors"];
    out.push_str(&format!(
        "open files  {} of {} (the limits can need {})\n",
        n(&d["open"]),
        n(&d["limit"]),
        n(&d["budget"])
    ));
    out.push_str(&format!(
        "ebpf  rules {}  redirected {}  map errors {}  fast path: enrolled {}  handed over {}\n",
        n(&s["ebpf"]["rules"]),
        n(&s["ebpf"]["redirected"]),
        n(&s["ebpf"]["map_errors"]),
        n(&s["ebpf"]["fast_enrolled"]),
        n(&s["ebpf"]["fast_handovers"])
    ));
    out.push_str(&format!(
        "network namespaces  served {}  connects from unprepared ones {}\n\n",
        n(&s["ebpf"]["netns_prepared"]),
        n(&s["ebpf"]["netns_unprepared"])
    ));
    let rows: Vec<[String; 3]> = s["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            [
                p["name"].as_str().unwrap_or("").to_owned(),
                p["protocol"].as_str().unwrap_or("").to_owned(),
                p["destination"].as_str().unwrap_or("").to_owned(),
            ]
        })
        .collect();
    let header = [
        "POLICY".to_owned(),
        "PROTOCOL".to_owned(),
        "DESTINATION".to_owned(),
    ];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].len())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1) = (width(0), width(1));
    for row in std::iter::once(&header).chain(&rows) {
        out.push_str(&format!("{:<w0$}  {:<w1$}  {}\n", row[0], row[1], row[2]));
    }
    out.push_str(&stores(s, std::time::SystemTime::now()));
    out
}

/// The stores: reachable or not, when their own credential and their leases expire.
fn stores(s: &Value, now: std::time::SystemTime) -> String {
    let Some(stores) = s["stores"].as_array().filter(|a| !a.is_empty()) else {
        return String::new();
    };
    let expires = |v: &Value| match v.as_u64() {
        Some(at) => latch::doctor::stores::expires_text(at, now),
        None => "-".to_owned(),
    };
    let rows: Vec<[String; 4]> = stores
        .iter()
        .map(|st| {
            [
                st["name"].as_str().unwrap_or("").to_owned(),
                st["kind"].as_str().unwrap_or("").to_owned(),
                match st["reachable"].as_bool() {
                    Some(true) => "yes".to_owned(),
                    _ => "NO".to_owned(),
                },
                expires(&st["credential_expires_at"]),
            ]
        })
        .collect();
    let header = ["STORE", "KIND", "REACHABLE", "CREDENTIAL"].map(str::to_owned);
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].len())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (width(0), width(1), width(2));
    let mut out = String::from("\n");
    for (row, st) in std::iter::once((&header, &Value::Null)).chain(rows.iter().zip(stores)) {
        out.push_str(&format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}\n",
            row[0], row[1], row[2], row[3]
        ));
        for lease in st["leases"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  lease {}  {}\n",
                lease["path"].as_str().unwrap_or(""),
                expires(&lease["expires_at"])
            ));
        }
        if let Some(e) = st["error"].as_str() {
            out.push_str(&format!("  error: {e}\n"));
        }
    }
    out
}

fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).with_context(|| {
        format!("no latch agent answers on {addr} (is it running? see --admin)")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_readable_table() {
        let s: Value = serde_json::json!({
            "version": "0.1.0", "ready": true, "cgroup": "/sys/fs/cgroup/x",
            "listeners": ["127.0.0.1:951", "[::1]:951"],
            "connections": {"active": 2, "relayed": 10, "failed": 1, "denied": 3, "refused": 0},
            "ebpf": {"rules": 4, "redirected": 14, "map_errors": 0, "fast_enrolled": 12,
                     "fast_handovers": 9, "netns_prepared": 3, "netns_unprepared": 1},
            "policies": [
                {"name": "orders-db", "protocol": "postgres", "destination": "orders-db.internal:5432"},
                {"name": "web", "protocol": "tcp", "destination": "10.0.3.0/24:80"}
            ]
        });
        let text = render(&s);
        assert!(text.contains("ready  cgroup /sys/fs/cgroup/x"), "{text}");
        assert!(
            text.contains("active 2  relayed 10  failed 1  denied 3  refused 0"),
            "{text}"
        );
        assert!(
            text.contains("fast path: enrolled 12  handed over 9"),
            "{text}"
        );
        assert!(
            text.contains("network namespaces  served 3  connects from unprepared ones 1\n"),
            "{text}"
        );
        assert!(
            text.contains("POLICY     PROTOCOL  DESTINATION\n"),
            "{text}"
        );
        assert!(
            text.contains("orders-db  postgres  orders-db.internal:5432\n"),
            "{text}"
        );
        assert!(!text.contains("STORE"), "{text}");
    }

    #[test]
    fn stores_with_credential_and_lease_expiry() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_796_322_000);
        let s: Value = serde_json::json!({"stores": [
            {"name": "bao", "kind": "vault", "reachable": true, "checked_at": 1,
             "credential_expires_at": 1_796_322_000u64 + 1800,
             "leases": [{"path": "database/creds/app", "expires_at": 1_796_322_000u64 + 90}]},
            {"name": "local", "kind": "file", "reachable": false, "checked_at": 1,
             "error": "secret store \"local\" is unreachable: gone"}
        ]});
        let text = stores(&s, now);
        assert!(
            text.contains("STORE  KIND   REACHABLE  CREDENTIAL\n"),
            "{text}"
        );
        assert!(
            text.contains("bao    vault  yes        expires 2026-12-03T18:50:00Z (in 30 min)\n"),
            "{text}"
        );
        assert!(
            text.contains("  lease database/creds/app  expires 2026-12-03T18:21:30Z (in 90 s)\n"),
            "{text}"
        );
        assert!(
            text.contains("local  file   NO         -\n  error: secret store"),
            "{text}"
        );
    }
}
