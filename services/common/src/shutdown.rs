//! Process-wide shutdown signal: ctrl-c or SIGTERM, shared by every server in the process.

use tokio::sync::watch;

/// A cloneable handle that resolves once shutdown was requested.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The trigger side of [`Shutdown`].
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

/// Creates a shutdown trigger and its first handle.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    /// Requests shutdown of every handle.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }

    /// A new handle on this trigger.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }
}

impl Shutdown {
    /// Resolves when shutdown is requested (or the trigger is dropped).
    pub async fn wait(mut self) {
        let _ = self.rx.wait_for(|stop| *stop).await;
    }

    /// A handle that never fires unless its trigger, which is leaked, is: for servers that
    /// live as long as the process.
    pub fn never() -> Self {
        let (trigger, handle) = channel();
        std::mem::forget(trigger);
        handle
    }
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn os_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received; draining in-flight requests");
}

/// A trigger fired by ctrl-c or SIGTERM.
pub fn on_os_signal() -> Shutdown {
    let (trigger, handle) = channel();
    tokio::spawn(async move {
        os_signal().await;
        trigger.trigger();
    });
    handle
}
