//! What operations rely on: grpc.health.v1 beside Flight, and Prometheus metrics that count what
//! clients did.

use artiflight_client::Request;
use artiflight_server::{Server, ServerOptions};
use futures::TryStreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::{TestResult, demo_dir};

async fn scrape(addr: std::net::SocketAddr, path: &str) -> Result<String, std::io::Error> {
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut answer = String::new();
    socket.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// The value of the sample `name` (with its labels) in a Prometheus text answer.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn health_and_metrics_report_what_happened() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = ServerOptions::new(dir.path().join("data"));
    options.allow_roots = vec![demo_dir().display().to_string()];
    let server = Server::open(&options)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("grpc://{}", listener.local_addr()?);
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let metrics_addr = metrics.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = server.clone();
    let served = tokio::spawn(async move {
        running
            .serve_with_metrics(listener, Some(metrics), async {
                let _ = stopped.await;
            })
            .await
    });

    let channel = tonic::transport::Endpoint::from_shared(url.replace("grpc://", "http://"))?
        .connect()
        .await?;
    let mut health = HealthClient::new(channel);
    for service in ["", "arrow.flight.protocol.FlightService"] {
        let answer = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        assert_eq!(
            answer.status(),
            ServingStatus::Serving,
            "service '{service}'"
        );
    }

    let client = artiflight_client::Client::connect(&url).await?;
    client
        .action("register", json!({"path": demo_dir(), "key": "demo"}))
        .await?;
    let (_, stream) = client.get(&Request::key("demo")).await?;
    let batches: Vec<_> = stream.try_collect().await?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();

    let text = scrape(metrics_addr, "/metrics").await?;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert_eq!(
        sample(&text, "artiflight_calls_total{rpc=\"DoAction\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "artiflight_calls_total{rpc=\"GetFlightInfo\"}"),
        Some(1.0)
    );
    let do_gets = sample(&text, "artiflight_calls_total{rpc=\"DoGet\"}").unwrap_or(0.0);
    assert!(do_gets >= 1.0, "{text}");
    assert_eq!(
        sample(&text, "artiflight_rows_sent_total"),
        Some(rows as f64)
    );
    assert!(sample(&text, "artiflight_bytes_sent_total").unwrap_or(0.0) > 0.0);
    assert_eq!(
        sample(&text, "artiflight_streams_started_total"),
        Some(do_gets)
    );
    assert_eq!(sample(&text, "artiflight_streams_open"), Some(0.0));
    assert!(sample(&text, "artiflight_query_memory_bytes").is_some());
    assert!(
        scrape(metrics_addr, "/other")
            .await?
            .starts_with("HTTP/1.1 404")
    );
    // A scraper that sends nothing holds nothing: the next scrape is answered.
    let _idle = tokio::net::TcpStream::connect(metrics_addr).await?;
    assert!(
        scrape(metrics_addr, "/metrics")
            .await?
            .starts_with("HTTP/1.1 200")
    );

    let _ = stop.send(());
    tokio::time::timeout(std::time::Duration::from_secs(30), served).await???;
    Ok(())
}
