//! The tokio runtime the engine owns, and [`Runtime::call`], the one way synchronous code runs
//! a database future on it.
//!
//! Callers may themselves run on another tokio runtime (an axum handler calling the store
//! directly or from `spawn_blocking`), where `Runtime::block_on` panics. So `call` never
//! blocks on a runtime: it spawns the future on the engine's runtime and waits for its result
//! on a plain channel.

use std::future::Future;
use std::sync::{Arc, mpsc};

use crate::error::{DatabaseErrorKind, Error, Result};

/// Worker threads of the engine's runtime: the work is network I/O and row conversion, so two
/// threads keep up with many connections without taking cores from the application.
const WORKER_THREADS: usize = 2;

/// A multi-thread tokio runtime owned by one engine. Dropping it never blocks: its tasks are
/// cancelled and its threads exit in the background, so it may be dropped inside an async
/// context.
pub(crate) struct Runtime {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl Runtime {
    /// Starts the runtime's worker threads (named `dedupe-postgres`).
    ///
    /// # Errors
    /// [`Error::ThreadStart`] when the threads cannot be started.
    pub(crate) fn new() -> Result<Runtime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name("dedupe-postgres")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|source| Error::ThreadStart {
                thread: "dedupe-postgres",
                source: Arc::new(source),
            })?;
        let handle = runtime.handle().clone();
        Ok(Runtime {
            runtime: Some(runtime),
            handle,
        })
    }

    /// Runs `fut` on the engine's runtime and waits on the calling thread for its result.
    /// Safe to call from any thread, including a worker of another tokio runtime (the caller's
    /// thread is blocked while it waits, as for any synchronous call).
    ///
    /// # Errors
    /// `fut`'s own error, or [`Error::Database`] of kind `Other` when the future panicked or
    /// the runtime is shutting down.
    pub(crate) fn call<T, F>(&self, fut: F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let (answer, reply) = mpsc::sync_channel(1);
        self.handle.spawn(async move {
            // The caller may have gone (it never does while it waits); nothing to tell then.
            let _ = answer.send(fut.await);
        });
        reply.recv().map_err(|_| Error::Database {
            action: "run a database call",
            kind: DatabaseErrorKind::Other,
            message: "the call panicked or the engine's runtime shut down".to_string(),
            source: None,
        })?
    }

    /// The runtime's handle, for spawning background tasks (a connection's driver).
    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

/// Runs `fut` to completion on the calling thread, parking it while the future waits. For the
/// engine's calls: a pooled client's requests and answers travel through channels to its
/// connection's driver on the engine's runtime, so they need no runtime on this thread, and
/// waiting here is a plain blocking wait, allowed inside another runtime's task as any
/// blocking call is.
pub(crate) fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);

    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }

    let mut fut = std::pin::pin!(fut);
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    loop {
        if let std::task::Poll::Ready(output) = fut.as_mut().poll(&mut cx) {
            return output;
        }
        // A wake between the poll and here leaves a token, so this returns at once.
        std::thread::park();
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn call_returns_the_futures_answer() -> Result<()> {
        let runtime = Runtime::new()?;
        assert_eq!(runtime.call(async { Ok(41 + 1) })?, 42);
        let err = runtime
            .call(async {
                Err::<(), _>(Error::InvalidConfig {
                    reason: "bad".to_string(),
                })
            })
            .expect_err("the future's error comes back");
        assert!(matches!(err, Error::InvalidConfig { .. }));
        Ok(())
    }

    #[test]
    fn call_reports_a_panicking_future_as_an_error() -> Result<()> {
        let runtime = Runtime::new()?;
        let err = runtime
            .call(async {
                if true {
                    panic!("boom");
                }
                Ok(())
            })
            .expect_err("a panic is an error");
        assert!(matches!(
            err,
            Error::Database {
                kind: DatabaseErrorKind::Other,
                ..
            }
        ));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn call_works_inside_another_runtime() -> Result<()> {
        let runtime = Runtime::new()?;
        let slept = runtime.call(async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok("slept")
        })?;
        assert_eq!(slept, "slept");
        // Dropping the engine's runtime inside an async context must not panic either.
        drop(runtime);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn call_works_from_spawn_blocking() -> Result<()> {
        let runtime = Arc::new(Runtime::new()?);
        let inner = Arc::clone(&runtime);
        let answer = tokio::task::spawn_blocking(move || inner.call(async { Ok(7_u64) }))
            .await
            .expect("the blocking task finished")?;
        assert_eq!(answer, 7);
        Ok(())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn call_works_on_a_current_thread_runtime() -> Result<()> {
        let runtime = Runtime::new()?;
        assert_eq!(runtime.call(async { Ok(1) })?, 1);
        drop(runtime);
        Ok(())
    }
}
