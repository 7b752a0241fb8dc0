//! cover-review: the story pushgate was built for. A creator uploads a cover
//! image; this business service reviews it in the background (real pixels:
//! size, shape, exposure, sharpness) and pushes the verdict through pushgate
//! to every tab the creator has open — no polling.
//!
//! ```text
//! cargo run --release                                   # pushgate, `demo` tenant
//! (cd clients/js && npm ci && npm run build)            # the browser client
//! cargo run --release --example cover-review            # http://127.0.0.1:3000
//! ```
//!
//! The page says who the creator is (`?creator=ann`): in a real service the
//! session would.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use serde::Deserialize;
use serde_json::{Value, json};

mod review;

/// The service's settings.
#[derive(Parser, Clone)]
struct Options {
    /// Where the page is served.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// pushgate's internal listener (the push API).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pushgate: String,
    /// The tenant's push key.
    #[arg(long, default_value = "demo-key")]
    push_key: String,
    /// The tenant's WebSocket endpoint, for the page.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws/demo")]
    websocket: String,
    /// The built JavaScript client (clients/js: npm run build).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js/dist/index.js"))]
    client_js: PathBuf,
}

struct Service {
    options: Options,
    http: reqwest::Client,
}

/// Largest image accepted.
const MAX_UPLOAD_BYTES: usize = 10 << 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let service = Arc::new(Service {
        http: reqwest::Client::new(),
        options: options.clone(),
    });
    let app = Router::new()
        .route("/", get(page))
        .route("/client.js", get(client_js))
        .route("/config.json", get(config))
        .route("/covers", post(upload))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES))
        .with_state(service);
    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    // The first line says where (a test reads it).
    println!(
        "cover-review listening on http://{}",
        listener.local_addr()?
    );
    axum::serve(listener, app).await?;
    Ok(())
}

async fn page() -> Response {
    let html = include_str!("index.html");
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

async fn client_js(State(service): State<Arc<Service>>) -> Response {
    match tokio::fs::read(&service.options.client_js).await {
        Ok(js) => ([(header::CONTENT_TYPE, "text/javascript")], js).into_response(),
        Err(err) => (
            StatusCode::NOT_FOUND,
            format!(
                "{}: {err}; build the client: (cd clients/js && npm ci && npm run build)",
                service.options.client_js.display()
            ),
        )
            .into_response(),
    }
}

async fn config(State(service): State<Arc<Service>>) -> Response {
    axum::Json(json!({ "websocket": service.options.websocket })).into_response()
}

#[derive(Deserialize)]
struct UploadQuery {
    creator: String,
    #[serde(default)]
    name: String,
}

/// `POST /covers?creator=…&name=…` with the image as the body: answered at
/// once (202); the verdict arrives through pushgate when the review is done.
async fn upload(
    State(service): State<Arc<Service>>,
    Query(query): Query<UploadQuery>,
    image: Bytes,
) -> Response {
    if query.creator.is_empty() || image.is_empty() {
        return (StatusCode::BAD_REQUEST, "a creator and an image are needed").into_response();
    }
    let upload = uuid::Uuid::now_v7().to_string();
    let answer = json!({ "upload": upload, "status": "reviewing" });
    tokio::spawn(async move {
        let name = query.name.clone();
        let verdict = tokio::task::spawn_blocking(move || review::review(&image))
            .await
            .unwrap_or_else(|err| review::Verdict::failed(format!("the review failed: {err}")));
        let message = json!({
            "type": "cover-reviewed",
            "upload": upload,
            "name": name,
            "verdict": verdict,
        });
        if let Err(err) = push(&service, &query.creator, message).await {
            eprintln!("cannot push the verdict of {upload}: {err}");
        }
    });
    (StatusCode::ACCEPTED, axum::Json(answer)).into_response()
}

/// Pushes `data` to every connection of `creator`.
async fn push(service: &Service, creator: &str, data: Value) -> anyhow::Result<()> {
    let response = service
        .http
        .post(format!("{}/v1/push", service.options.pushgate))
        .bearer_auth(&service.options.push_key)
        .json(&json!({ "users": [creator], "data": data }))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "pushgate answered {}: {}",
        response.status(),
        response.text().await.unwrap_or_default()
    );
    Ok(())
}
