//! A minimal pushgate client for the README tour: connects to a WebSocket
//! URL, prints every frame it receives, and sends each line typed on stdin
//! as a text frame (e.g. `{"type":"ping"}` or
//! `{"type":"subscribe","topic":"news"}`).
//!
//! ```text
//! cargo run --release --example client -- 'ws://127.0.0.1:8080/ws/demo?user=alice'
//! ```

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:8080/ws/demo?user=alice".to_owned());
    let (socket, _) = tokio_tungstenite::connect_async(&url).await?;
    eprintln!("connected to {url}");
    let (mut write, mut read) = socket.split();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            frame = read.next() => match frame {
                Some(Ok(Message::Text(text))) => println!("{text}"),
                Some(Ok(Message::Close(close))) => {
                    eprintln!("closed by the server: {close:?}");
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(err.into()),
                None => return Ok(()),
            },
            line = stdin.next_line() => match line? {
                Some(line) if !line.trim().is_empty() => write.send(Message::text(line)).await?,
                Some(_) => {}
                None => {
                    write.send(Message::Close(None)).await?;
                    return Ok(());
                }
            },
        }
    }
}
