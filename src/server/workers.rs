//! The ingress's worker threads: one single-threaded tokio runtime per thread, each
//! serving the connections handed to it from start to end — every request on a
//! connection is parsed, proxied to its guest and answered on the one thread, as nginx's
//! worker processes do. On tokio's multi-threaded scheduler the same work pays for
//! waking another worker and for work stealing on every request (5–8 % of the warm
//! path's throughput on this project's bench machine; docs/performance.md).
//!
//! Connections are accepted on the main runtime (one listener, one backlog, one
//! connection bound) and handed to the worker serving the fewest; a handed connection
//! never moves again. What outlives a request — VM owners, activity records — is spawned
//! on the main runtime by the lifecycle, not here.
//!
//! Owns: the worker threads and the hand-off. Must not import the activator, lifecycle
//! or backends.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio_util::task::TaskTracker;

/// A connection handed to a worker, with its place under the listener's bound.
struct Accepted {
    stream: std::net::TcpStream,
    permit: OwnedSemaphorePermit,
}

/// One worker thread: where to send it connections, and how many it serves.
struct Worker {
    connections: mpsc::UnboundedSender<Accepted>,
    serving: Arc<AtomicUsize>,
    finished: oneshot::Receiver<()>,
}

/// The worker threads of one listener.
pub(super) struct Workers {
    workers: Vec<Worker>,
}

impl Workers {
    /// Starts `count` worker threads (at least one), each serving the connections it is
    /// given with `serve`.
    pub(super) fn start<F, Fut>(count: usize, serve: F) -> std::io::Result<Workers>
    where
        F: Fn(TcpStream) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let workers = (0..count.max(1))
            .map(|index| spawn_worker(index, serve.clone()))
            .collect::<std::io::Result<_>>()?;
        Ok(Workers { workers })
    }

    /// Hands `stream` (with its `permit`, given back when the connection ends) to the
    /// worker serving the fewest connections.
    pub(super) fn hand_off(&self, stream: TcpStream, permit: OwnedSemaphorePermit) {
        let Ok(stream) = stream.into_std() else {
            // Deregistering failed: the socket is unusable; closing it is all we can do.
            return;
        };
        let worker = self
            .workers
            .iter()
            .min_by_key(|w| w.serving.load(Ordering::Relaxed))
            .expect("at least one worker");
        worker.serving.fetch_add(1, Ordering::Relaxed);
        if worker.connections.send(Accepted { stream, permit }).is_err() {
            // The worker's thread is gone (its runtime failed): the connection closes.
            worker.serving.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Stops handing off and waits until every worker has finished the connections it
    /// serves and its thread has ended.
    pub(super) async fn finish(self) {
        let mut finished = Vec::with_capacity(self.workers.len());
        for worker in self.workers {
            drop(worker.connections);
            finished.push(worker.finished);
        }
        for done in finished {
            let _ = done.await;
        }
    }
}

/// Starts worker `index`: a thread running a single-threaded runtime that serves each
/// connection it receives in a task of its own, until the sender is dropped and those
/// tasks have ended.
fn spawn_worker<F, Fut>(index: usize, serve: F) -> std::io::Result<Worker>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (connections, mut incoming) = mpsc::unbounded_channel::<Accepted>();
    let (done, finished) = oneshot::channel();
    let serving = Arc::new(AtomicUsize::new(0));
    let count = serving.clone();
    std::thread::Builder::new()
        .name(format!("ingress-{index}"))
        .spawn(move || {
            crate::proxy::use_pool_shard(index + 1);
            let tasks = TaskTracker::new();
            runtime.block_on(async {
                while let Some(Accepted { stream, permit }) = incoming.recv().await {
                    let stream = match TcpStream::from_std(stream) {
                        Ok(stream) => stream,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot serve an accepted connection");
                            count.fetch_sub(1, Ordering::Relaxed);
                            continue;
                        }
                    };
                    let (connection, count) = (serve(stream), count.clone());
                    tasks.spawn(async move {
                        connection.await;
                        count.fetch_sub(1, Ordering::Relaxed);
                        drop(permit);
                    });
                }
                tasks.close();
                tasks.wait().await;
            });
            // The runtime ends here, with whatever its requests left running (HTTP/2
            // streams of closed connections, idle guest connections' reaper).
            drop(runtime);
            let _ = done.send(());
        })?;
    Ok(Worker {
        connections,
        serving,
        finished,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;
    use tokio::sync::{watch, Semaphore};

    use super::*;

    /// Four connections on two workers: two each (the least-served first), each served
    /// on a worker's thread; the listener's places come back only when they end, and
    /// `finish` waits for that.
    #[tokio::test]
    async fn connections_are_spread_over_the_workers_and_finish_waits_for_them() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (served_on, served) = std::sync::mpsc::channel::<String>();
        let (release, released) = watch::channel(false);
        let workers = Workers::start(2, move |stream: TcpStream| {
            let (served_on, mut released) = (served_on.clone(), released.clone());
            async move {
                let thread = std::thread::current().name().unwrap_or_default().to_string();
                served_on.send(thread).unwrap();
                let _ = released.wait_for(|r| *r).await;
                drop(stream);
            }
        })
        .unwrap();

        let slots = Arc::new(Semaphore::new(4));
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            let (stream, _) = listener.accept().await.unwrap();
            workers.hand_off(stream, slots.clone().try_acquire_owned().unwrap());
        }
        let mut threads: Vec<String> = (0..4)
            .map(|_| served.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        threads.sort();
        assert_eq!(threads, ["ingress-0", "ingress-0", "ingress-1", "ingress-1"]);
        assert_eq!(slots.available_permits(), 0, "each connection holds its place");

        let mut finishing = tokio::spawn(workers.finish());
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut finishing)
                .await
                .is_err(),
            "finish waits for the connections being served"
        );
        release.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), finishing)
            .await
            .expect("the workers end once their connections have")
            .unwrap();
        assert_eq!(slots.available_permits(), 4, "every place given back");
    }
}
