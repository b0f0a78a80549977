//! A minimal QMP client for the QEMU machine protocol: commands answered in order,
//! the events that arrive meanwhile kept (a few) for whoever waits for one.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

/// How long QMP may take to come up after spawn, and to answer one command.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How many events that arrived while a command waited for its answer are kept.
const KEPT_EVENTS: usize = 16;

pub(super) async fn qmp_execute(slot: &Mutex<Option<Qmp>>, command: &str) -> Result<Value, String> {
    let mut guard = slot.lock().await;
    let qmp = guard.as_mut().ok_or("QMP is not connected")?;
    qmp.execute(command, None).await
}

/// A minimal QMP client: one connection, commands answered in order; events kept for
/// [`Qmp::wait_event`] (the last [`KEPT_EVENTS`]).
pub(super) struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connects and negotiates capabilities. The socket is normally the activator's own,
    /// bound before QEMU starts (see `process.rs`): the connection is made at once and
    /// the greeting comes as soon as QEMU is up. A socket QEMU creates itself is retried
    /// for until it exists.
    pub(super) async fn connect(path: &Path) -> Result<Qmp, String> {
        let deadline = tokio::time::Instant::now() + QMP_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("cannot connect to QMP at {}: {e}", path.display()))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(read),
            writer,
            events: VecDeque::new(),
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = tokio::time::timeout(QMP_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| "QMP did not answer in time".to_string())?
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP sent invalid JSON: {e}"))
    }

    /// Runs one command and returns its `return` value.
    pub(super) async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let message = self.read_message().await?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(format!("QMP {command}: {error}"));
            }
            // An asynchronous event (SHUTDOWN, MIGRATION, ...): not our answer, but
            // perhaps what someone waits for next.
            self.keep(message);
        }
    }

    fn keep(&mut self, event: Value) {
        if self.events.len() == KEPT_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Waits for the event `name` whose `data` satisfies `wanted` (one kept from before
    /// counts) and returns its data; other events are dropped. Each message must come
    /// within the QMP timeout.
    pub(super) async fn wait_event(&mut self, name: &str, wanted: impl Fn(&Value) -> bool) -> Result<Value, String> {
        let matches = |message: &Value| {
            message.get("event").and_then(Value::as_str) == Some(name)
                && wanted(message.get("data").unwrap_or(&Value::Null))
        };
        while let Some(event) = self.events.pop_front() {
            if matches(&event) {
                return Ok(event.get("data").cloned().unwrap_or(Value::Null));
            }
        }
        loop {
            let message = self.read_message().await?;
            if matches(&message) {
                return Ok(message.get("data").cloned().unwrap_or(Value::Null));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A QMP server that greets, answers `qmp_capabilities`, then answers the next command
    /// with `script` (lines sent in order: events and the command's return mixed).
    async fn serve(listener: UnixListener, script: Vec<Value>) {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let send = |message: Value| {
            let mut line = message.to_string();
            line.push('\n');
            line
        };
        let greeting = send(json!({ "QMP": { "version": {}, "capabilities": [] } }));
        write.write_all(greeting.as_bytes()).await.expect("greet");
        for answers in [vec![json!({ "return": {} })], script] {
            lines.next_line().await.expect("read").expect("a command");
            for answer in answers {
                write.write_all(send(answer).as_bytes()).await.expect("answer");
            }
        }
        // Keep the connection open until the client is done.
        let _ = lines.next_line().await;
    }

    /// A client connected to [`serve`] with `script`, and the server's task (the
    /// directory keeps the socket).
    async fn connected(script: Vec<Value>) -> (Qmp, tokio::task::JoinHandle<()>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(serve(listener, script));
        let qmp = Qmp::connect(&path).await.expect("connect");
        (qmp, server, dir)
    }

    fn migration(status: &str) -> Value {
        json!({ "event": "MIGRATION", "data": { "status": status }, "timestamp": {} })
    }

    #[tokio::test]
    async fn an_event_that_came_before_a_commands_answer_is_still_waited_for() {
        // The load finishes before QEMU answers the command that started it: its events
        // come first.
        let (mut qmp, server, _dir) = connected(vec![
            migration("setup"),
            json!({ "event": "RESUME", "timestamp": {} }),
            migration("completed"),
            json!({ "return": {} }),
        ])
        .await;
        qmp.execute("migrate-incoming", None).await.expect("answered");
        let done = tokio::time::timeout(
            Duration::from_secs(5),
            qmp.wait_event("MIGRATION", |data| data["status"] == "completed"),
        )
        .await
        .expect("the kept event is found without reading more")
        .expect("no error");
        assert_eq!(done["status"], "completed");
        drop(qmp);
        server.await.expect("server");
    }

    #[tokio::test]
    async fn waiting_for_an_event_skips_the_others_and_reads_on() {
        let (mut qmp, server, _dir) = connected(vec![
            json!({ "return": {} }),
            migration("setup"),
            migration("active"),
            migration("failed"),
        ])
        .await;
        qmp.execute("migrate-incoming", None).await.expect("answered");
        let ended = tokio::time::timeout(
            Duration::from_secs(5),
            qmp.wait_event("MIGRATION", |data| {
                matches!(data["status"].as_str(), Some("completed" | "failed"))
            }),
        )
        .await
        .expect("the wait ends")
        .expect("an end");
        assert_eq!(ended["status"], "failed");
        drop(qmp);
        server.await.expect("server");
    }

    #[tokio::test]
    async fn a_closed_connection_ends_the_wait_with_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            write.write_all(b"{\"QMP\": {}}\n").await.expect("greet");
            lines.next_line().await.expect("read");
            write.write_all(b"{\"return\": {}}\n").await.expect("answer");
            // QEMU ends (a failed load ends the process): the connection closes.
        });
        let mut qmp = Qmp::connect(&path).await.expect("connect");
        server.await.expect("server");
        let error = tokio::time::timeout(Duration::from_secs(5), qmp.wait_event("MIGRATION", |_| true))
            .await
            .expect("the wait ends")
            .expect_err("closed");
        assert!(error.contains("closed"), "{error}");
    }
}
