//! [`Sandbox`]: binds the listener, serves the routes over plain HTTP or TLS, and
//! gives tests an in-process handle to its faults and counters.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::SandboxConfig;
use super::app::App;
use super::routes::router;
use super::state::Stats;

/// A running sandbox.
#[derive(Debug)]
pub struct Sandbox {
    https: bool,
    addr: SocketAddr,
    app: Arc<App>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Sandbox {
    /// Binds `listen` (port 0 picks a free one) and serves until shut down.
    pub async fn start(cfg: SandboxConfig, listen: SocketAddr) -> std::io::Result<Sandbox> {
        let tls = cfg.tls.clone();
        let https = tls.is_some();
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let app = Arc::new(App::new(cfg));
        let router = router(app.clone());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = match tls {
            None => tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            }),
            Some((cert, key)) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let config =
                    axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key).await?;
                let server =
                    axum_server::tls_rustls::from_tcp_rustls(listener.into_std()?, config)?;
                let handle = axum_server::Handle::new();
                let closer = handle.clone();
                tokio::spawn(async move {
                    stop.cancelled().await;
                    closer.graceful_shutdown(Some(Duration::from_secs(1)));
                });
                tokio::spawn(server.handle(handle).serve(router.into_make_service()))
            }
        };
        Ok(Sandbox {
            https,
            addr,
            app,
            shutdown,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`, or `https://…` when serving TLS.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Changes the faults from now on (e.g. to end a simulated outage).
    pub fn set_faults(&self, cfg: SandboxConfig) {
        self.app.set_faults(cfg);
    }

    /// The counters, read in-process.
    pub fn stats(&self, detail: bool) -> Stats {
        self.app.stats(detail)
    }

    /// Stops accepting requests and waits for the server to end.
    pub(crate) async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }

    /// Serves until `stop` fires.
    pub(crate) async fn serve_until(self, stop: CancellationToken) {
        stop.cancelled().await;
        self.shutdown().await;
    }
}
