//! Tokens and roles, stream and row limits, request timeouts and shutdown, against a real server.

use std::time::{Duration, Instant};

use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::{FlightClient, Ticket};
use artiflight_client::{Client, Code, Options, Request};
use artiflight_server::catalog::Role;
use artiflight_server::token::Token;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use tonic::transport::Channel;

use crate::common::{
    TestResult, TestServer, register_demo, rows, sorted_schema, write_sorted_folder,
};

/// Makes a token in the server's catalog, as `artiflight token create` does.
async fn token(
    server: &TestServer,
    name: &str,
    role: Role,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let token = Token::generate();
    server
        .server
        .planner()
        .catalog()
        .create_token(name, role, &token.hash())
        .await?;
    Ok(token.secret().to_string())
}

async fn with_token(
    server: &TestServer,
    token: Option<&str>,
) -> Result<Client, artiflight_client::Error> {
    let options = Options {
        token: token.map(str::to_string),
        ca_pem: None,
    };
    Client::connect_with(&server.url, &options).await
}

fn code<T: std::fmt::Debug>(result: Result<T, artiflight_client::Error>) -> Option<Code> {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

fn small_batch() -> arrow::array::RecordBatch {
    use std::sync::Arc;
    arrow::array::RecordBatch::try_new(
        sorted_schema(),
        vec![
            Arc::new(arrow::array::Int64Array::from(vec![1, 2])),
            Arc::new(arrow::array::Float64Array::from(vec![0.5, 1.0])),
            Arc::new(arrow::array::StringArray::from(vec!["a", "b"])),
        ],
    )
    .expect("batch")
}

#[tokio::test]
async fn tokens_and_roles() -> TestResult {
    let server = TestServer::start_with(|o| o.auth = true).await?;
    register_demo(&server).await?;
    let reader = token(&server, "reader", Role::Read).await?;
    let writer = token(&server, "writer", Role::Write).await?;

    // No token, or a wrong one: nothing but the handshake answers, ListActions included.
    let anonymous = with_token(&server, None).await?;
    assert_eq!(
        code(anonymous.list(None).await),
        Some(Code::Unauthenticated)
    );
    let actions = anonymous.flight().list_actions().await.err();
    assert_eq!(
        actions.as_ref().and_then(status_code),
        Some(Code::Unauthenticated)
    );
    let request = Request::key("sharded_parquet").filter("louvain = 3");
    assert_eq!(
        code(anonymous.info(&request).await),
        Some(Code::Unauthenticated)
    );
    let wrong = with_token(&server, Some("afl_not-a-token")).await?;
    assert_eq!(code(wrong.list(None).await), Some(Code::Unauthenticated));

    // A read token reads, and is refused every write.
    let read = with_token(&server, Some(&reader)).await?;
    assert_eq!(read.list(None).await?.len(), 1);
    let (_, batches) = read.collect(&request).await?;
    assert!(rows(&batches) > 0);
    assert!(
        read.action("describe", json!({"key": "sharded_parquet"}))
            .await
            .is_ok()
    );
    assert_eq!(
        code(read.put("uploaded", vec![small_batch()]).await),
        Some(Code::PermissionDenied)
    );
    let dir = server.dir.path().display().to_string();
    for (action, body) in [
        ("register", json!({"path": dir, "key": "again"})),
        ("delete", json!({"key": "sharded_parquet"})),
        (
            "create_collection",
            json!({"key": "c", "members": ["sharded_parquet"]}),
        ),
    ] {
        assert_eq!(
            code(read.action(action, body).await),
            Some(Code::PermissionDenied),
            "{action}"
        );
    }

    // A write token writes.
    let write = with_token(&server, Some(&writer)).await?;
    let record = write.put("uploaded", vec![small_batch()]).await?;
    assert_eq!(record["key"], "uploaded");

    // Basic auth in the handshake (user = token name) answers with a bearer token that works.
    let channel = Channel::from_shared(server.url.replace("grpc://", "http://"))?
        .connect()
        .await?;
    let mut sql = FlightSqlServiceClient::new(channel.clone());
    let bearer = sql.handshake("reader", &reader).await;
    assert!(bearer.is_ok(), "{bearer:?}");
    let bearer = sql
        .token()
        .cloned()
        .ok_or("the handshake answered no bearer token")?;
    assert_eq!(
        with_token(&server, Some(&bearer))
            .await?
            .list(None)
            .await?
            .len(),
        2
    );
    let mut sql = FlightSqlServiceClient::new(channel.clone());
    assert!(
        sql.handshake("writer", &reader).await.is_err(),
        "a token under another name"
    );
    let mut sql = FlightSqlServiceClient::new(channel);
    assert!(sql.handshake("reader", "afl_wrong").await.is_err());

    // A revoked token stops working within seconds, with no restart.
    server
        .server
        .planner()
        .catalog()
        .revoke_token("reader")
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match read.list(None).await {
            Err(e) if e.code() == Some(Code::Unauthenticated) => break,
            _ if Instant::now() > deadline => panic!("the revoked token still works after 10 s"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(())
}

/// A folder large enough that its stream outlasts HTTP/2's flow-control windows (about 19 MB).
async fn big_server(
    configure: impl FnOnce(&mut artiflight_server::ServerOptions),
) -> Result<(TestServer, Vec<Ticket>), Box<dyn std::error::Error + Send + Sync>> {
    let server = TestServer::start_with(configure).await?;
    let folder = write_sorted_folder(&server.dir.path().join("big"), 2, 500_000, 100_000);
    server
        .server
        .registry()
        .register(folder.to_str().unwrap_or_default(), "big", None, true)
        .await?;
    let info = server.client().await?.info(&Request::key("big")).await?;
    let tickets = info
        .endpoint
        .iter()
        .filter_map(|e| e.ticket.clone())
        .collect();
    Ok((server, tickets))
}

fn flight(server: &TestServer) -> Result<FlightClient, Box<dyn std::error::Error + Send + Sync>> {
    let channel = Channel::from_shared(server.url.replace("grpc://", "http://"))?.connect_lazy();
    Ok(FlightClient::new(channel))
}

fn status_code(e: &arrow_flight::error::FlightError) -> Option<Code> {
    match e {
        arrow_flight::error::FlightError::Tonic(s) => Some(s.code()),
        _ => None,
    }
}

#[tokio::test]
async fn stream_permits_are_held_by_streams() -> TestResult {
    let (server, tickets) = big_server(|o| {
        o.limits.max_streams = Some(1);
        o.limits.queue_timeout = Duration::from_millis(300);
    })
    .await?;
    let mut first = flight(&server)?.do_get(tickets[0].clone()).await?;
    assert!(first.next().await.transpose()?.is_some());
    // The one permit is inside the first stream: the second DoGet waits, then is refused.
    let started = Instant::now();
    let second = flight(&server)?.do_get(tickets[0].clone()).await;
    let err = second.err().ok_or("a second stream ran beside the first")?;
    assert_eq!(status_code(&err), Some(Code::ResourceExhausted), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    // A client that goes away frees its permit.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match flight(&server)?.do_get(tickets[0].clone()).await {
            Ok(stream) => {
                let batches: Vec<_> = stream.try_collect().await?;
                assert_eq!(rows(&batches), 500_000);
                break;
            }
            Err(e) if Instant::now() > deadline => panic!("the permit was never freed: {e}"),
            Err(_) => {}
        }
    }
    Ok(())
}

#[tokio::test]
async fn rows_per_request_and_request_time_are_bounded() -> TestResult {
    let server = TestServer::start_with(|o| o.limits.max_rows = Some(20)).await?;
    register_demo(&server).await?;
    let client = server.client().await?;
    let all = client.collect(&Request::key("sharded_parquet")).await;
    assert_eq!(code(all), Some(Code::ResourceExhausted));
    let (_, few) = client
        .collect(&Request::key("sharded_parquet").limit(10))
        .await?;
    assert_eq!(rows(&few), 10);

    // Messages over the size limit are refused, and smaller ones still go in.
    let small = TestServer::start_with(|o| o.limits.max_message_bytes = 64 * 1024).await?;
    let client = small.client().await?;
    let big = arrow::array::RecordBatch::try_new(
        sorted_schema(),
        vec![
            std::sync::Arc::new(arrow::array::Int64Array::from_iter_values(0..100_000)),
            std::sync::Arc::new(arrow::array::Float64Array::from_iter_values(
                (0..100_000).map(f64::from),
            )),
            std::sync::Arc::new(arrow::array::StringArray::from_iter_values(
                (0..100_000).map(|i| format!("{i}")),
            )),
        ],
    )?;
    assert_eq!(
        code(client.put("big", vec![big]).await),
        Some(Code::ResourceExhausted)
    );
    client.put("small", vec![small_batch()]).await?;

    let slow =
        TestServer::start_with(|o| o.limits.request_timeout = Some(Duration::from_millis(20)))
            .await?;
    // Registering 600 files lists, inspects and hashes each: far longer than 20 ms.
    let folder = write_sorted_folder(&slow.dir.path().join("many"), 600, 100, 100);
    let body = json!({"path": folder.display().to_string(), "key": "many"});
    let started = Instant::now();
    let registered = slow.client().await?.action("register", body).await;
    assert_eq!(code(registered), Some(Code::DeadlineExceeded));
    assert!(started.elapsed() < Duration::from_secs(5));
    // The server goes on answering.
    assert!(slow.client().await?.list(None).await.is_ok());
    Ok(())
}

#[tokio::test]
async fn shutdown_ends_running_streams_after_the_grace() -> TestResult {
    let (server, tickets) = big_server(|o| {
        o.limits.shutdown_grace = Duration::from_millis(300);
        o.limits.max_streams = Some(1);
        o.limits.queue_timeout = Duration::from_secs(30);
    })
    .await?;
    let mut stream = flight(&server)?.do_get(tickets[0].clone()).await?;
    assert!(stream.next().await.transpose()?.is_some());
    // A second DoGet waits for the one permit, which the first stream holds.
    let mut waiting = flight(&server)?;
    let ticket = tickets[0].clone();
    let queued = tokio::spawn(async move { waiting.do_get(ticket).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let shutdown = tokio::spawn(server.shutdown());
    // The shutdown tells it at once, not after its 30 s queue timeout.
    let refused = tokio::time::timeout(Duration::from_secs(5), queued).await??;
    let refused = refused
        .err()
        .ok_or("a stream started during the shutdown")?;
    assert_eq!(status_code(&refused), Some(Code::Unavailable), "{refused}");
    assert!(refused.to_string().contains("shutting down"), "{refused}");
    // A slow reader: the whole stream would take seconds, longer than the grace.
    let mut ended = None;
    for _ in 0..1_000 {
        match stream.next().await {
            Some(Ok(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Some(Err(e)) => {
                ended = status_code(&e);
                assert!(e.to_string().contains("shutting down"), "{e}");
                break;
            }
            None => break,
        }
    }
    assert_eq!(
        ended,
        Some(Code::Unavailable),
        "the stream was not ended by the shutdown"
    );
    let took = shutdown.await??;
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    Ok(())
}

/// Every RPC but the Handshake asks for a token, and every write asks for a write token: one
/// table over the whole service, Flight SQL included, so that a route that skips the check fails.
#[tokio::test]
async fn every_call_checks_the_token() -> TestResult {
    use arrow_flight::flight_service_client::FlightServiceClient;
    use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
    use arrow_flight::{Action, Criteria, Empty, FlightData, FlightDescriptor};
    use prost::Message;

    let server = TestServer::start_with(|o| o.auth = true).await?;
    register_demo(&server).await?;
    let reader = token(&server, "reader", Role::Read).await?;
    let ticket = with_token(&server, Some(&reader))
        .await?
        .info(&Request::key("sharded_parquet"))
        .await?
        .endpoint[0]
        .ticket
        .clone()
        .ok_or("no ticket")?;

    let channel = Channel::from_shared(server.url.replace("grpc://", "http://"))?
        .connect()
        .await?;
    let mut raw = FlightServiceClient::new(channel.clone());
    fn request<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(t) = token
            && let Ok(value) = format!("Bearer {t}").parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }
    fn code<T>(r: Result<T, tonic::Status>) -> Option<Code> {
        r.err().map(|s| s.code())
    }
    let sql = FlightDescriptor::new_cmd(
        CommandStatementQuery {
            query: "SELECT 1".into(),
            transaction_id: None,
        }
        .as_any()
        .encode_to_vec(),
    );
    let path = FlightDescriptor::new_path(vec!["sharded_parquet".into()]);
    // DoPut's first message: a schema under a path descriptor, or an add_column command.
    let upload = |descriptor: FlightDescriptor| -> Vec<FlightData> {
        let schema = arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
            "x",
            arrow::datatypes::DataType::Int64,
            false,
        )]);
        let ipc: arrow_flight::IpcMessage =
            arrow_flight::SchemaAsIpc::new(&schema, &Default::default())
                .try_into()
                .expect("schema");
        vec![FlightData {
            flight_descriptor: Some(descriptor),
            data_header: ipc.0,
            ..Default::default()
        }]
    };
    let add_column = FlightDescriptor::new_cmd(serde_json::to_vec(
        &json!({"action": "add_column", "key": "k", "element": "obs", "name": "n"}),
    )?);

    for token in [None, Some("afl_not-a-token")] {
        let want = Some(Code::Unauthenticated);
        assert_eq!(
            code(raw.list_flights(request(token, Criteria::default())).await),
            want,
            "ListFlights"
        );
        assert_eq!(
            code(raw.list_actions(request(token, Empty {})).await),
            want,
            "ListActions"
        );
        assert_eq!(
            code(raw.get_flight_info(request(token, path.clone())).await),
            want,
            "GetFlightInfo"
        );
        assert_eq!(
            code(raw.get_flight_info(request(token, sql.clone())).await),
            want,
            "Flight SQL"
        );
        assert_eq!(
            code(raw.get_schema(request(token, path.clone())).await),
            want,
            "GetSchema"
        );
        assert_eq!(
            code(raw.poll_flight_info(request(token, path.clone())).await),
            want,
            "PollFlightInfo"
        );
        assert_eq!(
            code(raw.do_get(request(token, ticket.clone())).await),
            want,
            "DoGet"
        );
        let describe = Action::new("describe", r#"{"key": "sharded_parquet"}"#);
        assert_eq!(
            code(raw.do_action(request(token, describe)).await),
            want,
            "describe"
        );
        let prepare = Action::new(
            "CreatePreparedStatement",
            arrow_flight::sql::ActionCreatePreparedStatementRequest {
                query: "SELECT 1".into(),
                transaction_id: None,
            }
            .as_any()
            .encode_to_vec(),
        );
        assert_eq!(
            code(raw.do_action(request(token, prepare)).await),
            want,
            "prepare"
        );
        let put = futures::stream::iter(upload(path.clone()));
        assert_eq!(code(raw.do_put(request(token, put)).await), want, "DoPut");
        let exchange = futures::stream::iter(upload(path.clone()));
        assert_eq!(
            code(raw.do_exchange(request(token, exchange)).await),
            want,
            "DoExchange"
        );
    }

    // A read token reads, and every write is PERMISSION_DENIED.
    let read = Some(reader.as_str());
    assert!(
        raw.list_flights(request(read, Criteria::default()))
            .await
            .is_ok()
    );
    assert!(raw.get_schema(request(read, path.clone())).await.is_ok());
    assert!(raw.get_flight_info(request(read, sql)).await.is_ok());
    let want = Some(Code::PermissionDenied);
    for descriptor in [path.clone(), add_column] {
        let put = futures::stream::iter(upload(descriptor));
        let answer = match raw.do_put(request(read, put)).await {
            Ok(response) => futures::TryStreamExt::try_collect::<Vec<_>>(response.into_inner())
                .await
                .map(|_| ()),
            Err(status) => Err(status),
        };
        assert_eq!(code(answer), want, "DoPut");
    }
    let body = json!({"key": "k", "element": "obs", "name": "n", "values": [1]}).to_string();
    assert_eq!(
        code(
            raw.do_action(request(read, Action::new("add_column", body)))
                .await
        ),
        want,
        "add_column"
    );

    // The SQL worker service (other servers' query stages) checks the token like Flight does.
    // Its GetWorkerInfo request is empty, as Flight's `Empty` is, and its answer decodes as one.
    let mut worker = tonic::client::Grpc::new(channel);
    for (token, want) in [
        (None, Some(Code::Unauthenticated)),
        (Some("afl_not-a-token"), Some(Code::Unauthenticated)),
        (read, None),
    ] {
        worker.ready().await?;
        let answer: Result<tonic::Response<Empty>, tonic::Status> = worker
            .unary(
                request(token, Empty {}),
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/worker.WorkerService/GetWorkerInfo",
                ),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        assert_eq!(code(answer), want, "GetWorkerInfo with {token:?}");
    }
    Ok(())
}
