//! How calls leave for providers: hyper-util's pooled HTTP/1.1 client over a connector
//! that speaks TLS (rustls, Mozilla's roots) to `https://` providers and goes through
//! the outbound HTTP proxy the environment names, as curl and reqwest do:
//! `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` (lower case too).
//!
//! - An `https://` provider behind a proxy is reached through a `CONNECT` tunnel (with
//!   the proxy's credentials, if its URL has them), then TLS to the provider itself,
//!   so the proxy sees neither the key nor the prompt.
//! - An `http://` provider behind a proxy gets its request sent to the proxy in
//!   absolute form, with a `Proxy-Authorization` header if the proxy's URL has
//!   credentials (`Egress::forward_auth`).
//! - The proxy itself may be `http://` or `https://`; other schemes (SOCKS) are refused
//!   with a clear error.
//!
//! Providers' certificates are checked against Mozilla's roots (`webpki-roots`), plus the
//! PEM certificates of the file `SSL_CERT_FILE` names, when set (as for OpenSSL and curl):
//! for a self-hosted endpoint (vLLM, Ollama) behind a private certificate authority.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderValue, Uri};
use http_body_util::Full;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tower::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Plain = MaybeHttpsStream<TokioIo<TcpStream>>;

pub(super) type HttpClient = Client<Egress, Full<Bytes>>;

/// The client every HTTP provider is called through, with `proxies` deciding which
/// calls go through an outbound proxy, and `extra_roots` trusted beside Mozilla's roots.
pub(super) fn client(
    proxies: Matcher,
    extra_roots: Vec<CertificateDer<'static>>,
    connect_timeout: Duration,
    idle_per_host: usize,
) -> (HttpClient, Egress) {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout));
    let tls = tls_config(extra_roots);
    let direct = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    let egress = Egress {
        direct,
        tls: tokio_rustls::TlsConnector::from(tls),
        proxies: Arc::new(proxies),
    };
    // The timer reaps connections idle for 90 s (hyper-util's default idle timeout),
    // as reqwest's client did.
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(idle_per_host)
        .pool_timer(TokioTimer::new())
        .build(egress.clone());
    (client, egress)
}

/// rustls with ring, Mozilla's roots (`webpki-roots`: the same trust wherever Bursar
/// runs, whatever the host's certificate store holds) and `extra_roots`.
fn tls_config(extra_roots: Vec<CertificateDer<'static>>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let (added, refused) = roots.add_parsable_certificates(extra_roots);
    if refused > 0 {
        tracing::error!(
            added,
            refused,
            "some certificates of SSL_CERT_FILE are not valid CA certificates and are not trusted"
        );
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| {
        b.with_root_certificates(roots.clone())
            .with_no_client_auth()
    })
    // Not reached: ring's provider has every default protocol version.
    .unwrap_or_else(|_| {
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth()
    });
    Arc::new(config)
}

/// The certificates of the file `SSL_CERT_FILE` names, trusted beside Mozilla's roots;
/// none when it is not set. A file that cannot be read is logged as an error, naming
/// it: calls to a provider it was for then fail their TLS handshake, saying why.
pub(super) fn roots_from_env() -> Vec<CertificateDer<'static>> {
    let Some(path) = std::env::var_os("SSL_CERT_FILE").filter(|p| !p.is_empty()) else {
        return Vec::new();
    };
    match read_roots(Path::new(&path)) {
        Ok(certs) => {
            tracing::info!(file = %Path::new(&path).display(), certificates = certs.len(), "providers' certificates are also checked against SSL_CERT_FILE");
            certs
        }
        Err(e) => {
            tracing::error!(error = %e, "SSL_CERT_FILE is not used");
            Vec::new()
        }
    }
}

/// The PEM certificates of `path`: at least one, every one readable.
pub(super) fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let what = |e: rustls::pki_types::pem::Error| format!("{}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(what)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(what)?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The connector: straight to the provider, or through the proxy the environment
/// names for it.
#[derive(Clone)]
pub(super) struct Egress {
    direct: HttpsConnector<HttpConnector>,
    /// TLS to an `https://` provider at the end of a proxy's tunnel.
    tls: tokio_rustls::TlsConnector,
    proxies: Arc<Matcher>,
}

impl Egress {
    /// The proxy a call to `uri` goes through, if any (for the logs: no credentials).
    pub(super) fn proxy_for(&self, uri: &Uri) -> Option<Uri> {
        self.proxies.intercept(uri).map(|i| i.uri().clone())
    }

    /// The `Proxy-Authorization` a request to the `http://` address `uri` carries: the
    /// proxy forwarding it has credentials in its URL. (An `https://` provider's proxy
    /// gets them in the tunnel's `CONNECT` instead.)
    pub(super) fn forward_auth(&self, uri: &Uri) -> Option<HeaderValue> {
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let mut auth = self.proxies.intercept(uri)?.basic_auth()?.clone();
        auth.set_sensitive(true);
        Some(auth)
    }

    async fn connect(mut self, dst: Uri) -> Result<Conn, BoxError> {
        let Some(proxy) = self.proxies.intercept(&dst) else {
            return Ok(Conn::plain(ready_call(&mut self.direct, dst).await?, false));
        };
        let scheme = proxy.uri().scheme_str().unwrap_or("");
        if !matches!(scheme, "http" | "https") {
            return Err(format!(
                "the outbound proxy's scheme `{scheme}` is not supported (an http:// or https:// proxy is)"
            )
            .into());
        }
        if dst.scheme_str() != Some("https") {
            // The proxy forwards the request, sent to it in absolute form.
            let to_proxy = ready_call(&mut self.direct, proxy.uri().clone()).await?;
            return Ok(Conn::plain(to_proxy, true));
        }
        let mut tunnel = Tunnel::new(proxy.uri().clone(), self.direct.clone());
        if let Some(auth) = proxy.basic_auth() {
            tunnel = tunnel.with_auth(auth.clone());
        }
        let tunneled = ready_call(&mut tunnel, dst.clone()).await?;
        let host = dst.host().ok_or("the provider's URL has no host")?;
        let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']))
            .map_err(|_| format!("`{host}` is not a valid TLS server name"))?
            .to_owned();
        let tls = self.tls.connect(name, TokioIo::new(tunneled)).await?;
        Ok(Conn {
            io: Io::Tunneled(Box::new(TokioIo::new(tls))),
            proxied: false,
        })
    }
}

/// Waits for `svc` to be ready, then calls it.
async fn ready_call<S>(svc: &mut S, uri: Uri) -> Result<S::Response, BoxError>
where
    S: Service<Uri>,
    S::Error: Into<BoxError>,
{
    std::future::poll_fn(|cx| svc.poll_ready(cx))
        .await
        .map_err(Into::into)?;
    svc.call(uri).await.map_err(Into::into)
}

impl Service<Uri> for Egress {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        Box::pin(self.clone().connect(dst))
    }
}

type TunneledTls = TokioIo<tokio_rustls::client::TlsStream<TokioIo<Plain>>>;

/// A connection to a provider, or to the proxy that forwards to it.
pub(super) struct Conn {
    io: Io,
    /// To a forwarding proxy: requests go in absolute form.
    proxied: bool,
}

/// Boxed: a TLS stream is about a kilobyte, and a connection is made once for many
/// calls.
enum Io {
    Plain(Box<Plain>),
    Tunneled(Box<TunneledTls>),
}

impl Conn {
    fn plain(io: Plain, proxied: bool) -> Conn {
        Conn {
            io: Io::Plain(Box::new(io)),
            proxied,
        }
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match &self.io {
            Io::Plain(io) => io.connected().proxy(self.proxied),
            Io::Tunneled(_) => Connected::new(),
        }
    }
}

impl Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
            Io::Tunneled(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
            Io::Tunneled(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io.as_mut()).poll_flush(cx),
            Io::Tunneled(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
            Io::Tunneled(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tunneled(io) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
            Io::Tunneled(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}
