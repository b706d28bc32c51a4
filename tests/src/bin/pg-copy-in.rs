//! A tokio-postgres client, run by the tests as a workload: `COPY … FROM
//! STDIN` over the extended protocol (`copy_in`, which sends Sync while the
//! COPY is in progress), then a query on the same connection.
//!
//! Usage: pg-copy-in HOST PORT TABLE ROWS
use futures::SinkExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, host, port, table, rows] = &args[..] else {
        return Err("usage: pg-copy-in HOST PORT TABLE ROWS".into());
    };
    let rows: u64 = rows.parse()?;
    let (client, connection) = tokio_postgres::connect(
        &format!("host={host} port={port} user=anyone dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(connection);
    let sink = client
        .copy_in(&format!("COPY {table} (id, body) FROM STDIN"))
        .await?;
    futures::pin_mut!(sink);
    for i in 0..rows {
        sink.send(bytes::Bytes::from(format!("{i}\trow {i}\n")))
            .await?;
    }
    let copied = sink.finish().await?;
    let count: i64 = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    println!("copied {copied} count {count}");
    Ok(())
}
