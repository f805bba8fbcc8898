//! `latch-probe my URL SCENARIO`: a mysql_async client holding no password (URL
//! `mysql://user@host:port/db`). Scenarios:
//!
//! * `whoami` — print `user=<current_user()> id=<CONNECTION_ID()> greeted=<id from the
//!   greeting>`.
//! * `suite` — queries, prepared statements with parameters, a 17 MiB blob (a packet split in
//!   two on the wire) each way, several result sets; prints `suite ok`.
//! * `kill` — one session runs `SELECT SLEEP(30)`; a second one sees it in the process list
//!   under the first one's id and runs `KILL QUERY <id>`; prints `killed in <ms>ms`.
//! * `infile` — `LOAD DATA LOCAL INFILE` of 1000 rows, each its own packet (so the sequence
//!   ids wrap past 255 several times), then a query on the same session; prints
//!   `infile rows=1000 sum=499500 then=1`.
//! * `changeuser` — COM_CHANGE_USER to user `root` with password `guess`: prints
//!   `change_user=<error code or ok>`, then `after=<CURRENT_USER()>` on the same session.
//! * `changeuser:U1,U2,...` — COM_CHANGE_USER to each user in turn (password `guess`) on one
//!   session; for each prints `<user>: ok after=<CURRENT_USER()> x=<@x>` or
//!   `<user>: <code> <SQLSTATE> <message> after=<CURRENT_USER()> x=<@x>` (or `after=gone` when
//!   the session is no longer usable, and stops); `@x` is set to 5 before each change, so
//!   `x=NULL` says the change reset the session.
//! * `bigquery` — one 1 MB statement; prints `bigquery length=1000000 then=1`.
//! * `compression` — prints `compression=<ON|OFF>`: whether the server's session uses the
//!   compressed protocol (its `Compression` status).
//! * `reset` — `SET @x = 5`, COM_RESET_CONNECTION, then prints
//!   `reset=ok user=<CURRENT_USER()> x=<@x or NULL>`.
use std::time::{Duration, Instant};

use mysql_async::{Conn, Opts, prelude::*};

pub async fn run(url: &str, scenario: &str) -> Result<(), String> {
    match scenario {
        "whoami" => {
            let mut conn = connect(url).await?;
            let (user, id): (String, u32) = conn
                .query_first("SELECT CURRENT_USER(), CONNECTION_ID()")
                .await
                .map_err(e)?
                .ok_or("no row")?;
            println!("user={user} id={id} greeted={}", conn.id());
            conn.disconnect().await.map_err(e)
        }
        "suite" => suite(url).await,
        "kill" => kill(url).await,
        "changeuser" => change_user(url).await,
        "reset" => reset(url).await,
        s if s.starts_with("changeuser:") => change_users(url, &s["changeuser:".len()..]).await,
        "infile" => infile(url).await,
        "bigquery" => {
            // A statement text of 1 MB: several compressed frames on any leg.
            let mut conn = connect(url).await?;
            let sql = format!("SELECT LENGTH('{}'), 1", "x".repeat(1_000_000));
            let row: Option<(u64, u8)> = conn.query_first(sql).await.map_err(e)?;
            let (len, one) = row.ok_or("no row")?;
            println!("bigquery length={len} then={one}");
            conn.disconnect().await.map_err(e)
        }
        "compression" => {
            let mut conn = connect(url).await?;
            let row: Option<(String, String)> = conn
                .query_first("SHOW SESSION STATUS LIKE 'Compression'")
                .await
                .map_err(e)?;
            println!("compression={}", row.ok_or("no row")?.1);
            conn.disconnect().await.map_err(e)
        }
        other => Err(format!("unknown my scenario {other:?}")),
    }
}

fn e(err: impl std::fmt::Display) -> String {
    format!("mysql: {err}")
}

async fn connect(url: &str) -> Result<Conn, String> {
    let opts = Opts::from_url(url).map_err(e)?;
    Conn::new(opts).await.map_err(e)
}

async fn suite(url: &str) -> Result<(), String> {
    let mut conn = connect(url).await?;
    conn.query_drop(
        "CREATE TEMPORARY TABLE t (id INT PRIMARY KEY, name VARCHAR(64), data LONGBLOB)",
    )
    .await
    .map_err(e)?;
    let insert = conn
        .prep("INSERT INTO t (id, name, data) VALUES (?, ?, ?)")
        .await
        .map_err(e)?;
    for i in 0..50u32 {
        conn.exec_drop(&insert, (i, format!("row {i}"), vec![i as u8; 16]))
            .await
            .map_err(e)?;
    }
    let n: u64 = conn
        .exec_first("SELECT COUNT(*) FROM t WHERE id >= ?", (10,))
        .await
        .map_err(e)?
        .ok_or("no count")?;
    if n != 40 {
        return Err(format!("count {n}, expected 40"));
    }
    let name: String = conn
        .exec_first("SELECT name FROM t WHERE id = ?", (42,))
        .await
        .map_err(e)?
        .ok_or("no row 42")?;
    if name != "row 42" {
        return Err(format!("name {name:?}"));
    }
    // A value larger than one packet (0xFFFFFF bytes) each way.
    let big: Vec<u8> = (0..17 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    conn.exec_drop(&insert, (1000, "big", big.clone()))
        .await
        .map_err(e)?;
    let back: Vec<u8> = conn
        .query_first("SELECT data FROM t WHERE id = 1000")
        .await
        .map_err(e)?
        .ok_or("no big row")?;
    if back != big {
        return Err(format!("blob came back as {} bytes, differing", back.len()));
    }
    // Several result sets from one query.
    let mut result = conn
        .query_iter("SELECT 1; SELECT 2, 3; SELECT name FROM t WHERE id = 7")
        .await
        .map_err(e)?;
    let mut sets = 0;
    while !result.is_empty() {
        let rows: Vec<mysql_async::Row> = result.collect().await.map_err(e)?;
        if rows.is_empty() {
            return Err("empty result set".into());
        }
        sets += 1;
    }
    drop(result);
    if sets != 3 {
        return Err(format!("{sets} result sets, expected 3"));
    }
    conn.disconnect().await.map_err(e)?;
    println!("suite ok");
    Ok(())
}

async fn kill(url: &str) -> Result<(), String> {
    let mut sleeper = connect(url).await?;
    let id = sleeper.id();
    let real: u32 = sleeper
        .query_first("SELECT CONNECTION_ID()")
        .await
        .map_err(e)?
        .ok_or("no id")?;
    if real != id {
        return Err(format!(
            "greeted with connection id {id}, CONNECTION_ID() is {real}"
        ));
    }
    let started = Instant::now();
    let sleeping = tokio::spawn(async move {
        let r: Result<Option<i64>, _> = sleeper.query_first("SELECT SLEEP(30)").await;
        r.map_err(e)
    });
    let mut killer = connect(url).await?;
    loop {
        let running: Option<u64> = killer
            .exec_first(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ? AND INFO = 'SELECT SLEEP(30)'",
                (id,),
            )
            .await
            .map_err(e)?;
        if running == Some(1) {
            break;
        }
        if started.elapsed() > Duration::from_secs(10) {
            return Err(format!("the query of connection {id} never showed up"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    killer
        .query_drop(format!("KILL QUERY {id}"))
        .await
        .map_err(e)?;
    let got = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .map_err(|_| "SLEEP(30) was not interrupted within 10 s".to_string())?
        .map_err(e)?;
    // MariaDB's SLEEP returns 1 when it is killed; other servers fail the query.
    match got {
        Ok(Some(1)) | Err(_) => {}
        Ok(other) => return Err(format!("SLEEP returned {other:?}")),
    }
    println!("killed in {}ms", started.elapsed().as_millis());
    Ok(())
}

async fn change_user(url: &str) -> Result<(), String> {
    let mut conn = connect(url).await?;
    let opts = mysql_async::ChangeUserOpts::default()
        .with_user(Some("root".into()))
        .with_pass(Some("guess".into()));
    match conn.change_user(opts).await {
        Ok(()) => println!("change_user=ok"),
        Err(mysql_async::Error::Server(s)) => println!("change_user={}", s.code),
        Err(other) => println!("change_user=other {other}"),
    }
    let user: String = conn
        .query_first("SELECT CURRENT_USER()")
        .await
        .map_err(e)?
        .ok_or("no row")?;
    println!("after={user}");
    conn.disconnect().await.map_err(e)
}

async fn change_users(url: &str, users: &str) -> Result<(), String> {
    let mut conn = connect(url).await?;
    conn.query_drop("SET @x = 5").await.map_err(e)?;
    for user in users.split(',') {
        let opts = mysql_async::ChangeUserOpts::default()
            .with_user(Some(user.into()))
            .with_pass(Some("guess".into()));
        let said = match conn.change_user(opts).await {
            Ok(()) => "ok".to_owned(),
            Err(mysql_async::Error::Server(s)) => format!("{} {} {}", s.code, s.state, s.message),
            Err(other) => format!("other {other}"),
        };
        let after: Result<Option<(String, Option<i64>)>, _> =
            conn.query_first("SELECT CURRENT_USER(), @x").await;
        match after {
            Ok(Some((u, x))) => {
                let x = x.map_or("NULL".to_owned(), |x| x.to_string());
                println!("{user}: {said} after={u} x={x}");
                conn.query_drop("SET @x = 5").await.map_err(e)?;
            }
            _ => {
                println!("{user}: {said} after=gone");
                return Ok(());
            }
        }
    }
    conn.disconnect().await.map_err(e)
}

async fn reset(url: &str) -> Result<(), String> {
    let mut conn = connect(url).await?;
    conn.query_drop("SET @x = 5").await.map_err(e)?;
    conn.reset().await.map_err(e)?;
    let (user, x): (String, Option<i64>) = conn
        .query_first("SELECT CURRENT_USER(), @x")
        .await
        .map_err(e)?
        .ok_or("no row")?;
    let x = x.map_or("NULL".to_owned(), |x| x.to_string());
    println!("reset=ok user={user} x={x}");
    conn.disconnect().await.map_err(e)
}

async fn infile(url: &str) -> Result<(), String> {
    let mut conn = connect(url).await?;
    conn.query_drop("CREATE TEMPORARY TABLE li (id INT PRIMARY KEY, name VARCHAR(32))")
        .await
        .map_err(e)?;
    // One chunk per row: mysql_async writes each as its own packet.
    let rows = (0..1000u32).map(|i| Ok(bytes::Bytes::from(format!("{i}\trow {i}\n"))));
    conn.set_infile_handler(async move {
        Ok(Box::pin(futures_util::stream::iter(rows)) as mysql_async::InfileData)
    });
    conn.query_drop("LOAD DATA LOCAL INFILE 'rows' INTO TABLE li (id, name)")
        .await
        .map_err(e)?;
    let (n, sum): (u64, u64) = conn
        .query_first("SELECT COUNT(*), SUM(id) FROM li")
        .await
        .map_err(e)?
        .ok_or("no row")?;
    let then: u32 = conn
        .query_first("SELECT 1")
        .await
        .map_err(e)?
        .ok_or("no row")?;
    println!("infile rows={n} sum={sum} then={then}");
    conn.disconnect().await.map_err(e)
}
