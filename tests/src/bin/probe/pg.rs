//! `latch-probe pg CONNSTR SCENARIO`: a tokio-postgres client holding no password. Scenarios:
//!
//! * `whoami` — print `user=<current_user> db=<current_database()>`.
//! * `suite` — prepared statements, COPY in and out, LISTEN/NOTIFY, multi-megabyte values;
//!   prints `suite ok`.
//! * `cancel` — run `pg_sleep(30)`, cancel it with a `CancelToken` after a second; prints
//!   `cancelled in <ms>ms` when the server reports 57014.
//! * `hold` — query, print `ready`, wait for a line on stdin, query again on the same session
//!   and on a new one; prints `old session ok` and `new session ok`.
//! * `hold-cancel` — as `hold`, then `cancel` on the old session.
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _, pin_mut};
use tokio_postgres::{AsyncMessage, Client, NoTls, error::SqlState};

pub async fn run(connstr: &str, scenario: &str) -> Result<(), String> {
    match scenario {
        "whoami" => {
            let (client, _notes) = connect(connstr).await?;
            println!("{}", whoami(&client).await?);
            Ok(())
        }
        "suite" => suite(connstr).await,
        "cancel" => cancel(connstr).await,
        "hold" => hold(connstr, false).await,
        "hold-cancel" => hold(connstr, true).await,
        other => Err(format!("unknown pg scenario {other:?}")),
    }
}

/// Connects and drives the connection in a task; notifications arrive on the channel.
pub async fn connect(
    connstr: &str,
) -> Result<
    (
        Client,
        tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
    ),
    String,
> {
    let (client, mut connection) = tokio_postgres::connect(connstr, NoTls)
        .await
        .map_err(|e| format!("connect: {}", describe(&e)))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        pin_mut!(stream);
        while let Some(m) = stream.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n);
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("connection: {e}");
                    return;
                }
            }
        }
    });
    Ok((client, rx))
}

pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => e.to_string(),
    }
}

async fn whoami(client: &Client) -> Result<String, String> {
    let row = client
        .query_one("select current_user::text, current_database()::text", &[])
        .await
        .map_err(|e| format!("query: {}", describe(&e)))?;
    Ok(format!(
        "user={} db={}",
        row.get::<_, String>(0),
        row.get::<_, String>(1)
    ))
}

fn check(cond: bool, what: &str) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(format!("check failed: {what}"))
    }
}

async fn suite(connstr: &str) -> Result<(), String> {
    let (client, mut notes) = connect(connstr).await?;
    let e = |what: &'static str| {
        move |err: tokio_postgres::Error| format!("{what}: {}", describe(&err))
    };

    // Prepared statements, reused.
    let stmt = client
        .prepare("select $1::int4 + 1")
        .await
        .map_err(e("prepare"))?;
    for i in 0..50 {
        let row = client.query_one(&stmt, &[&i]).await.map_err(e("execute"))?;
        check(row.get::<_, i32>(0) == i + 1, "prepared statement result")?;
    }

    // COPY in and out.
    client
        .batch_execute("create temp table t (a int4, b text)")
        .await
        .map_err(e("create table"))?;
    let sink = client
        .copy_in("copy t from stdin")
        .await
        .map_err(e("copy in"))?;
    pin_mut!(sink);
    let mut data = String::new();
    for i in 0..10_000 {
        data.push_str(&format!("{i}\trow {i}\n"));
    }
    sink.send(bytes::Bytes::from(data.clone()))
        .await
        .map_err(e("copy in send"))?;
    let n = sink.finish().await.map_err(e("copy in finish"))?;
    check(n == 10_000, "copy in row count")?;
    let stream = client
        .copy_out("copy t to stdout")
        .await
        .map_err(e("copy out"))?;
    pin_mut!(stream);
    let mut back = Vec::new();
    while let Some(chunk) = stream.next().await {
        back.extend_from_slice(&chunk.map_err(e("copy out read"))?);
    }
    check(
        back == data.as_bytes(),
        "copy out returns what copy in sent",
    )?;

    // LISTEN/NOTIFY on the same session.
    client
        .batch_execute("listen latch_probe; notify latch_probe, 'hello'")
        .await
        .map_err(e("listen/notify"))?;
    let n = tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .map_err(|_| "no notification within 5s".to_string())?
        .ok_or("connection closed")?;
    check(
        n.channel() == "latch_probe" && n.payload() == "hello",
        "notification",
    )?;

    // Multi-megabyte values both ways.
    let big = "y".repeat(6 * 1024 * 1024);
    let row = client
        .query_one("select length($1::text), repeat('x', 8388608)", &[&big])
        .await
        .map_err(e("big row"))?;
    check(
        row.get::<_, i32>(0) == big.len() as i32,
        "big parameter length",
    )?;
    let s: String = row.get(1);
    check(
        s.len() == 8 * 1024 * 1024 && s.bytes().all(|b| b == b'x'),
        "big result",
    )?;

    println!("{}", whoami(&client).await?);
    println!("suite ok");
    Ok(())
}

async fn cancel(connstr: &str) -> Result<(), String> {
    let (client, _notes) = connect(connstr).await?;
    cancel_on(&client).await
}

/// Runs `pg_sleep(30)` on `client` and cancels it after a second.
async fn cancel_on(client: &Client) -> Result<(), String> {
    let token = client.cancel_token();
    let started = Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        token.cancel_query(NoTls).await
    });
    let res = tokio::time::timeout(
        Duration::from_secs(20),
        client.simple_query("select pg_sleep(30)"),
    )
    .await
    .map_err(|_| "the query was not cancelled within 20s".to_string())?;
    canceller
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cancel_query: {e}"))?;
    match res {
        Err(err) if err.code() == Some(&SqlState::QUERY_CANCELED) => {
            println!("cancelled in {}ms", started.elapsed().as_millis());
            // The session is still usable afterwards.
            println!("{}", whoami(client).await?);
            Ok(())
        }
        Err(err) => Err(format!("query failed otherwise: {}", describe(&err))),
        Ok(_) => Err("pg_sleep finished: not cancelled".into()),
    }
}

async fn hold(connstr: &str, cancel: bool) -> Result<(), String> {
    let (client, _notes) = connect(connstr).await?;
    println!("{}", whoami(&client).await?);
    println!("ready");
    let mut line = String::new();
    tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    println!("old session ok {}", whoami(&client).await?);
    let (fresh, _n) = connect(connstr).await?;
    println!("new session ok {}", whoami(&fresh).await?);
    if cancel {
        cancel_on(&client).await?;
    }
    Ok(())
}
