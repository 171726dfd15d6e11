//! Errors exactly as SPEC section 6, and no input that panics the server.

use arrow_flight::{FlightDescriptor, Ticket};
use artiflight_client::{Code, Request};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::common::*;

fn code_of<T: std::fmt::Debug>(
    result: Result<T, artiflight_client::Error>,
) -> (Option<Code>, String) {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => (e.code(), e.to_string()),
    }
}

#[tokio::test]
async fn statuses_name_what_went_wrong() -> TestResult {
    let server = demo_server().await?;
    let client = server.client().await?;
    let info = |r: Request| {
        let client = client.clone();
        async move { client.info(&r).await.map(|_| ()) }
    };

    let (code, msg) = code_of(info(Request::key("nope")).await);
    assert_eq!(code, Some(Code::NotFound));
    assert!(msg.contains("nope"), "{msg}");
    let (code, _) =
        code_of(info(Request::key("sharded_parquet").version("AAAAAAAAAAAAAAAA0009")).await);
    assert_eq!(code, Some(Code::NotFound));
    let (code, msg) = code_of(info(Request::key("sharded_parquet").element(["X"])).await);
    assert_eq!(code, Some(Code::NotFound), "{msg}");

    let (code, msg) =
        code_of(info(Request::key("sharded_parquet").filter("no_such_column > 1")).await);
    assert_eq!(code, Some(Code::InvalidArgument));
    assert!(msg.contains("no_such_column"), "{msg}");
    for bad in [
        "n_genes >",
        "1 = 1; DROP TABLE t",
        "n_genes > 1 UNION SELECT 1",
        ") OR (1=1",
    ] {
        let (code, msg) = code_of(info(Request::key("sharded_parquet").filter(bad)).await);
        assert_eq!(code, Some(Code::InvalidArgument), "{bad}: {msg}");
    }
    let (code, msg) = code_of(info(Request::key("sharded_parquet").columns(["missing"])).await);
    assert_eq!(code, Some(Code::InvalidArgument));
    assert!(msg.contains("missing"), "{msg}");
    let (code, _) = code_of(info(Request::key("sharded_parquet").field("limit", json!(-1))).await);
    assert_eq!(code, Some(Code::InvalidArgument));
    let (code, msg) =
        code_of(info(Request::key("sharded_parquet").field("colour", json!("red"))).await);
    assert_eq!(code, Some(Code::InvalidArgument));
    assert!(msg.contains("colour"), "{msg}");
    // A huge limit is just a limit.
    let (_, all) = client
        .collect(&Request::key("sharded_parquet").limit(u64::MAX))
        .await?;
    assert_eq!(rows(&all), 700);

    let mut flight = client.flight();
    for cmd in [&b"not json"[..], b"\xff\xfe\x00", b"{\"key\": 1}", b""] {
        let err = flight
            .get_flight_info(FlightDescriptor::new_cmd(cmd.to_vec()))
            .await
            .expect_err("bad cmd");
        assert_eq!(
            artiflight_client::Error::from(err).code(),
            Some(Code::InvalidArgument)
        );
    }

    let (code, msg) = code_of(client.action("frobnicate", json!({})).await);
    assert_eq!(code, Some(Code::InvalidArgument));
    assert!(msg.contains("frobnicate"), "{msg}");

    // Reads outside the allowed roots: a plain path, a `..` escape, a symlink.
    let outside = tempfile::tempdir()?;
    write_sorted_folder(&outside.path().join("x"), 1, 10, 10);
    let (code, _) = code_of(
        client
            .action(
                "register",
                json!({"path": outside.path().join("x"), "key": "x"}),
            )
            .await,
    );
    assert_eq!(code, Some(Code::PermissionDenied));
    let escape = server
        .dir
        .path()
        .join("..")
        .join(outside.path().file_name().unwrap_or_default())
        .join("x");
    let (code, _) = code_of(
        client
            .action("register", json!({"path": escape, "key": "x"}))
            .await,
    );
    assert_eq!(code, Some(Code::PermissionDenied));
    let link = server.dir.path().join("link");
    std::os::unix::fs::symlink(outside.path().join("x"), &link)?;
    let (code, _) = code_of(
        client
            .action("register", json!({"path": link, "key": "x"}))
            .await,
    );
    assert_eq!(code, Some(Code::PermissionDenied));
    let url = format!("file://{}", outside.path().join("x").display());
    let (code, _) = code_of(
        client
            .action("register", json!({"path": url, "key": "x"}))
            .await,
    );
    assert_eq!(code, Some(Code::PermissionDenied));
    Ok(())
}

#[tokio::test]
async fn garbage_gets_errors_and_the_server_keeps_serving() -> TestResult {
    let server = demo_server().await?;
    let client = server.client().await?;
    let mut flight = client.flight();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let good = client.info(&Request::key("sharded_parquet")).await?;
    let ticket = good.endpoint[0].ticket.clone().expect("ticket");
    let pieces = [
        "{",
        "}",
        "\"key\"",
        ":",
        "\"sharded_parquet\"",
        ",",
        "\"filter\"",
        "\"louvain = \"",
        "[",
        "]",
        "null",
        "-1",
        "1e999",
        "\"limit\"",
        "\"columns\"",
        "\"query\"",
        "{\"suffix\": 3}",
        "\u{0}",
    ];
    for round in 0..300 {
        let descriptor = match round % 3 {
            0 => {
                let len = rng.random_range(0..64);
                FlightDescriptor::new_cmd((0..len).map(|_| rng.random::<u8>()).collect::<Vec<u8>>())
            }
            1 => {
                let n = rng.random_range(1..12);
                let json: String = (0..n)
                    .map(|_| pieces[rng.random_range(0..pieces.len())])
                    .collect();
                FlightDescriptor::new_cmd(json)
            }
            _ => {
                let n = rng.random_range(0..4);
                FlightDescriptor::new_path(
                    (0..n)
                        .map(|_| format!("k{}", rng.random::<u16>()))
                        .collect(),
                )
            }
        };
        // Each either answers or fails with a status; none may take the server down.
        let _ = flight.get_flight_info(descriptor).await;
        // Random tickets, and real tickets with bytes flipped.
        let mut bytes = if round % 2 == 0 {
            (0..rng.random_range(0..48))
                .map(|_| rng.random::<u8>())
                .collect::<Vec<u8>>()
        } else {
            ticket.ticket.to_vec()
        };
        if !bytes.is_empty() {
            let at = rng.random_range(0..bytes.len());
            bytes[at] ^= rng.random_range(1..=255u8);
        }
        if let Ok(stream) = flight.do_get(Ticket::new(bytes)).await {
            use futures::StreamExt;
            let _ = stream.take(100).collect::<Vec<_>>().await;
        }
    }
    let (_, batches) = client.collect(&Request::key("sharded_parquet")).await?;
    assert_eq!(rows(&batches), 700);
    Ok(())
}

#[tokio::test]
async fn a_corrupt_file_is_reported_and_the_server_keeps_serving() -> TestResult {
    let server = demo_server().await?;
    let client = server.client().await?;
    let dir = write_sorted_folder(&server.dir.path().join("fragile"), 2, 100, 50);
    client
        .action("register", json!({"path": dir, "key": "fragile"}))
        .await?;
    // The bytes change under the record: one shard becomes garbage of the same name.
    std::fs::write(
        dir.join("part=1/data.parquet"),
        b"PAR1 not really parquet at all PAR1",
    )?;
    let result = client.collect(&Request::key("fragile")).await;
    let (code, msg) = code_of(result);
    assert!(code == Some(Code::DataLoss), "{code:?}: {msg}");
    assert!(
        msg.contains("data.parquet") || msg.contains("fragile"),
        "names the file: {msg}"
    );
    // A file that was never parquet is refused at registration, naming it.
    let bogus = server.dir.path().join("bogus.parquet");
    std::fs::write(&bogus, b"hello")?;
    let (code, msg) = code_of(
        client
            .action("register", json!({"path": bogus, "key": "bogus"}))
            .await,
    );
    assert!(code == Some(Code::DataLoss), "{code:?}: {msg}");
    assert!(msg.contains("bogus.parquet"), "{msg}");
    let (_, batches) = client.collect(&Request::key("sharded_parquet")).await?;
    assert_eq!(rows(&batches), 700);
    Ok(())
}
