//! How connections are made: the URL read into the driver's settings, and TLS as
//! its `sslmode` asks, with the system's roots, the URL's `sslrootcert` and
//! `--ca-cert`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig};
use tokio_postgres::config::SslMode;

use crate::error::{Error, Result};
use crate::store::PgUrl;
use crate::store::failure::Failure;

/// The driver's settings and TLS, to make the pool's connections and the lock's.
#[derive(Clone)]
pub(super) struct Connector {
    config: tokio_postgres::Config,
    /// Whether the URL names the schema (`options=-csearch_path=…`); if not, the
    /// record goes in [`DEFAULT_SCHEMA`].
    pub(super) schema_named: bool,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The settings hold the password: never shown.
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Reads `url`. `sslmode` is libpq's: `disable`, `allow`/`prefer` (the default:
    /// TLS when the server offers it), `require`, `verify-ca`, `verify-full`. Whenever
    /// TLS is used the server's certificate and name are verified (stricter than
    /// libpq's `require`, which trusts any certificate).
    pub(super) fn new(
        url: &PgUrl,
        busy_timeout: std::time::Duration,
        ca_cert: Option<&Path>,
    ) -> Result<Connector> {
        let (plain, mode, roots) = tls_params(url, ca_cert)?;
        let mut config: tokio_postgres::Config = plain.as_str().parse().map_err(|e| {
            Error::Usage(format!(
                "--db {}: {e}; see the PostgreSQL section of deploy/README.md",
                url.shown()
            ))
        })?;
        config.ssl_mode(mode);
        let schema_named = session(&mut config, busy_timeout);
        let tls = match mode {
            SslMode::Disable => None,
            _ => Some(tls_config(&roots)?),
        };
        Ok(Connector {
            config,
            schema_named,
            tls,
        })
    }

    /// The pool's manager.
    pub(super) fn manager(&self, config: ManagerConfig) -> Manager {
        match &self.tls {
            Some(tls) => Manager::from_config(self.config.clone(), tls.clone(), config),
            None => Manager::from_config(self.config.clone(), tokio_postgres::NoTls, config),
        }
    }

    /// A connection of its own; `ended` runs when it closes (for the lock).
    pub(super) async fn connect(
        &self,
        ended: impl FnOnce() + Send + 'static,
    ) -> Result<tokio_postgres::Client, Failure> {
        match &self.tls {
            Some(tls) => connect_with(&self.config, tls.clone(), ended).await,
            None => connect_with(&self.config, tokio_postgres::NoTls, ended).await,
        }
    }
}

/// Connects with `tls`, and drives the connection in a task of its own until it
/// closes, then runs `ended`.
async fn connect_with<T>(
    config: &tokio_postgres::Config,
    tls: T,
    ended: impl FnOnce() + Send + 'static,
) -> Result<tokio_postgres::Client, Failure>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
        ended();
    });
    Ok(client)
}

/// The URL without the TLS parameters this program reads itself (the driver knows
/// neither `sslrootcert` nor libpq's `verify-*` modes), the mode, and the roots to
/// trust besides the system's (`sslrootcert`, `--ca-cert`).
fn tls_params(url: &PgUrl, ca_cert: Option<&Path>) -> Result<(url::Url, SslMode, Vec<PathBuf>)> {
    let mut plain = url.secret().clone();
    let mut mode = SslMode::Prefer;
    let mut roots: Vec<PathBuf> = ca_cert.into_iter().map(Path::to_owned).collect();
    let mut kept: Vec<(String, String)> = Vec::new();
    for (key, value) in url.secret().query_pairs() {
        match key.as_ref() {
            "sslmode" => {
                mode = match value.as_ref() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" | "verify-ca" | "verify-full" => SslMode::Require,
                    other => {
                        return Err(Error::Usage(format!(
                            "--db: sslmode={other} is not one of disable, allow, prefer, \
                             require, verify-ca, verify-full"
                        )));
                    }
                }
            }
            "sslrootcert" => roots.push(PathBuf::from(value.as_ref())),
            known if DRIVER_PARAMS.contains(&known) => {
                kept.push((key.into_owned(), value.into_owned()));
            }
            other => {
                return Err(Error::Usage(format!(
                    "--db: the URL's parameter {other} is not one kohort-batch reads (it reads \
                     sslmode, sslrootcert, {}); libpq's password and client-certificate \
                     files are not supported",
                    DRIVER_PARAMS.join(", ")
                )));
            }
        }
    }
    plain.set_query(None);
    if !kept.is_empty() {
        plain.query_pairs_mut().extend_pairs(kept);
    }
    Ok((plain, mode, roots))
}

/// The URL parameters the driver reads (besides `sslmode` and `sslrootcert`, read
/// here); any other is refused by name before the driver says only "invalid".
const DRIVER_PARAMS: [&str; 14] = [
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "target_session_attrs",
    "channel_binding",
];

/// The session's settings: its name, timeouts, keepalives, `lock_timeout` from
/// `--busy-timeout` (a wait for another session's lock ends then, as SQLite's busy
/// timeout does), and the schema. Returns whether the URL named the schema.
fn session(config: &mut tokio_postgres::Config, busy_timeout: std::time::Duration) -> bool {
    if config.get_application_name().is_none() {
        config.application_name("kohort-batch");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    // A server gone silent (a network that drops packets) is noticed in about a
    // minute, not hours.
    config.keepalives_idle(std::time::Duration::from_secs(30));
    config.keepalives_interval(std::time::Duration::from_secs(10));
    config.keepalives_retries(3);
    let given = config.get_options().unwrap_or_default().to_owned();
    let schema_named = given.contains("search_path");
    let mut options = format!(
        "{given} -c lock_timeout={}",
        busy_timeout.as_millis().max(1)
    );
    if !schema_named {
        // Never the shop's `public`, where an application's own `jobs` or `runs`
        // may be, or come later.
        options.push_str(&format!(" -c search_path={DEFAULT_SCHEMA}"));
    }
    config.options(options.trim());
    schema_named
}

/// The schema of the record when the URL names none.
pub(super) const DEFAULT_SCHEMA: &str = "kohort_batch";

/// TLS with the system's roots and the given PEM files.
fn tls_config(extra: &[PathBuf]) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system root rustls cannot read is left out, as the system's tools do.
        let _ = roots.add(cert);
    }
    for path in extra {
        let unreadable = |what: String| {
            Error::Usage(format!(
                "the CA certificate {} for PostgreSQL {what}: give a PEM file",
                path.display()
            ))
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| unreadable(format!("cannot be read ({e})")))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unreadable(format!("is not PEM ({e})")))?;
        if certs.is_empty() {
            return Err(unreadable("holds no certificate".to_owned()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| unreadable(format!("is refused ({e})")))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::internal_from("cannot set up TLS for PostgreSQL", e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}
