//! Calls to providers: over HTTP (`egress`: hyper's pooled client, TLS by rustls, the
//! environment's outbound proxy), or in process to the simulated provider, both seen by
//! the proxy as a status and a body (whole, or a stream of bytes). Each provider has its
//! circuit breaker here.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, LOCATION, PROXY_AUTHORIZATION,
};
use axum::http::{Request, StatusCode, Uri};
use bursar_core::providers::{CircuitBreaker, Provider, ProviderKind, Routing};
use bursar_core::FastMap;
use futures_util::{Stream, StreamExt};
use http_body_util::{BodyDataStream, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::proxy::matcher::Matcher;
use parking_lot::Mutex;

use super::egress::{self, HttpClient};
use super::wire::Dialect;
use crate::sim::{SimAnswer, Simulator};

/// How long a connection to a provider may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Anthropic API version sent with every call.
const ANTHROPIC_VERSION: &str = "2023-06-01";
/// Idle connections kept open to each provider host.
const IDLE_PER_HOST: usize = 256;

pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// The proxied endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Chat,
    Messages,
    Embeddings,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Messages => "/v1/messages",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }

    pub fn dialect(self) -> Dialect {
        match self {
            Endpoint::Messages => Dialect::Anthropic,
            Endpoint::Chat | Endpoint::Embeddings => Dialect::OpenAi,
        }
    }

    /// The endpoint of the same kind in another dialect (where a translated call goes).
    pub fn speaking(self, d: Dialect) -> Endpoint {
        match (self, d) {
            (Endpoint::Embeddings, _) => Endpoint::Embeddings,
            (_, Dialect::OpenAi) => Endpoint::Chat,
            (_, Dialect::Anthropic) => Endpoint::Messages,
        }
    }
}

/// Can this provider answer this endpoint (chat in either dialect is translated;
/// Anthropic has no embeddings)?
pub fn speaks(kind: ProviderKind, ep: Endpoint) -> bool {
    kind != ProviderKind::Anthropic || ep != Endpoint::Embeddings
}

/// The dialect a provider is spoken to in, for a client speaking `client`: the
/// simulated provider speaks both.
pub fn provider_dialect(kind: ProviderKind, client: Dialect) -> Dialect {
    match kind {
        ProviderKind::Simulated => client,
        ProviderKind::Openai => Dialect::OpenAi,
        ProviderKind::Anthropic => Dialect::Anthropic,
    }
}

pub enum UpBody {
    Full(Bytes),
    Stream(ByteStream),
}

pub struct UpResponse {
    pub status: StatusCode,
    pub body: UpBody,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpError {
    #[error("the provider did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the provider could not be reached: {0}")]
    Unreachable(String),
    /// The provider answered with a redirect, which is not followed: the call would go
    /// to an address nobody configured, and its body (a 307 or 308 sends it again) with
    /// it. The status and the address it names, if any (logged, not told to the caller).
    #[error("the provider answered {}, a redirect", .0.as_u16())]
    Redirected(StatusCode, Option<String>),
    /// The provider's answer (with this status) was longer than the provider's
    /// `max_answer_bytes`; it was not read.
    #[error("the provider's answer ({}) was longer than {} bytes", .0.as_u16(), .1)]
    TooLarge(StatusCode, u64),
}

/// Reads a whole answer, refusing one longer than `limit` bytes before it is held in
/// memory: by its `Content-Length` when it gives one, else as its chunks arrive. An
/// answer in one chunk is not copied.
async fn read_whole(
    resp: hyper::Response<Incoming>,
    status: StatusCode,
    limit: u64,
) -> Result<Bytes, UpError> {
    let too_large = |len: usize| u64::try_from(len).map_or(true, |n| n > limit);
    // The body's exact size is its `Content-Length`, when it has one.
    if hyper::body::Body::size_hint(resp.body())
        .exact()
        .is_some_and(|n| n > limit)
    {
        return Err(UpError::TooLarge(status, limit));
    }
    let mut body = resp.into_body();
    let Some(first) = next_data(&mut body).await? else {
        return Ok(Bytes::new());
    };
    if too_large(first.len()) {
        return Err(UpError::TooLarge(status, limit));
    }
    let Some(second) = next_data(&mut body).await? else {
        return Ok(first);
    };
    let mut whole = first.to_vec();
    let mut next = Some(second);
    while let Some(chunk) = next {
        if too_large(whole.len().saturating_add(chunk.len())) {
            return Err(UpError::TooLarge(status, limit));
        }
        whole.extend_from_slice(&chunk);
        next = next_data(&mut body).await?;
    }
    Ok(Bytes::from(whole))
}

/// The body's next chunk of data, skipping trailers; `None` at its end.
async fn next_data(body: &mut Incoming) -> Result<Option<Bytes>, UpError> {
    while let Some(frame) = body.frame().await {
        match frame
            .map_err(|e| UpError::Unreachable(error_chain(&e)))?
            .into_data()
        {
            Ok(data) if !data.is_empty() => return Ok(Some(data)),
            _ => {}
        }
    }
    Ok(None)
}

/// An error and its causes, as one line ("client error (Connect): tcp connect error:
/// Connection refused (os error 111)"): the outermost alone says too little.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// What is sent to one provider's endpoint, made once: its address and the headers
/// every call carries (with the outbound proxy's credentials when it forwards them).
struct Target {
    uri: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// The headers every call to `p` carries: the content type, its key (read from its
/// environment variable, once) and Anthropic's version. A key is marked sensitive, so
/// it is never logged.
fn provider_headers(p: &Provider) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = vec![(CONTENT_TYPE, HeaderValue::from_static("application/json"))];
    let key = p.api_key_env.as_ref().and_then(|var| match std::env::var(var) {
        Ok(k) if !k.is_empty() => Some(k),
        _ => {
            tracing::warn!(provider = %p.name, variable = %var, "provider key variable is not set");
            None
        }
    });
    if let Some(key) = key {
        let (name, value) = match p.kind {
            ProviderKind::Anthropic => (HeaderName::from_static("x-api-key"), key),
            _ => (AUTHORIZATION, format!("Bearer {key}")),
        };
        match HeaderValue::from_str(&value) {
            Ok(mut v) => {
                v.set_sensitive(true);
                headers.push((name, v));
            }
            Err(_) => {
                tracing::warn!(provider = %p.name, "provider key is not a valid header value; calls go without it")
            }
        }
    }
    if p.kind == ProviderKind::Anthropic {
        headers.push((
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(ANTHROPIC_VERSION),
        ));
    }
    headers
}

pub struct Upstreams {
    http: HttpClient,
    /// Each HTTP provider's target per endpoint, made once.
    targets: FastMap<String, HashMap<Endpoint, Target>>,
    sims: FastMap<String, Arc<Simulator>>,
    breakers: FastMap<String, Mutex<CircuitBreaker>>,
    epoch: Instant,
}

impl Upstreams {
    /// Reads each provider's key from its environment variable, the outbound proxy from
    /// `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`, and the certificates to
    /// trust beside Mozilla's roots from `SSL_CERT_FILE`, once.
    pub fn new(routing: &Routing) -> Self {
        Self::with_egress(routing, Matcher::from_env(), egress::roots_from_env())
    }

    /// As [`Upstreams::new`], with the outbound proxies `proxies` decides, and
    /// `extra_roots` trusted beside Mozilla's roots.
    fn with_egress(
        routing: &Routing,
        proxies: Matcher,
        extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    ) -> Self {
        let (http, egress) = egress::client(proxies, extra_roots, CONNECT_TIMEOUT, IDLE_PER_HOST);
        let mut sims = FastMap::default();
        let mut breakers = FastMap::default();
        let mut targets = FastMap::default();
        for p in &routing.providers {
            let headers = provider_headers(p);
            let parsed: HashMap<Endpoint, Target> =
                [Endpoint::Chat, Endpoint::Messages, Endpoint::Embeddings]
                    .into_iter()
                    .filter_map(|ep| {
                        let uri = format!("{}{}", p.base_url, ep.path()).parse::<Uri>().ok()?;
                        let known = matches!(uri.scheme_str(), Some("http" | "https"));
                        known.then(|| {
                            let mut headers = headers.clone();
                            if let Some(auth) = egress.forward_auth(&uri) {
                                headers.push((PROXY_AUTHORIZATION, auth));
                            }
                            (ep, Target { uri, headers })
                        })
                    })
                    .collect();
            // The simulated provider has no target: it answers in process.
            let proxy = parsed
                .values()
                .next()
                .and_then(|t| egress.proxy_for(&t.uri));
            if let Some(proxy) = proxy {
                tracing::info!(provider = %p.name, %proxy, "calls to this provider go through an outbound proxy");
            }
            targets.insert(p.name.clone(), parsed);
            if p.kind == ProviderKind::Simulated {
                sims.insert(p.name.clone(), Arc::new(Simulator::new(p.simulate.clone())));
            }
            breakers.insert(
                p.name.clone(),
                Mutex::new(CircuitBreaker::new(p.circuit_failures, p.circuit_open_ms)),
            );
        }
        Upstreams {
            http,
            targets,
            sims,
            breakers,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// May a call go to this provider now (its circuit is closed, or this is the probe)?
    pub fn allow(&self, p: &Provider) -> bool {
        self.breakers
            .get(&p.name)
            .is_none_or(|b| b.lock().allow(self.now_ms()))
    }

    pub fn record(&self, p: &Provider, ok: bool) {
        if let Some(b) = self.breakers.get(&p.name) {
            let mut b = b.lock();
            if ok {
                b.record_success();
            } else {
                let was_open = b.is_open();
                b.record_failure(self.now_ms());
                if b.is_open() && !was_open {
                    tracing::warn!(provider = %p.name, "circuit opened");
                    metrics::counter!("bursar_circuit_opened_total", "provider" => p.name.clone())
                        .increment(1);
                }
            }
        }
    }

    pub fn circuit_open(&self, name: &str) -> bool {
        self.breakers.get(name).is_some_and(|b| b.lock().is_open())
    }

    /// Sends one request. A stream is returned as soon as the provider's headers arrive
    /// (the caller applies the idle timeout between chunks); anything else is read whole.
    pub async fn send(
        &self,
        p: &Provider,
        ep: Endpoint,
        body: Bytes,
        stream: bool,
    ) -> Result<UpResponse, UpError> {
        if let Some(sim) = self.sims.get(&p.name) {
            return self.simulate(sim, p, ep, &body).await;
        }
        let Some(target) = self.targets.get(&p.name).and_then(|m| m.get(&ep)) else {
            return Err(UpError::Unreachable(format!(
                "`{}` is not a valid http:// or https:// URL",
                p.base_url
            )));
        };
        let mut req = Request::post(target.uri.clone());
        if let Some(h) = req.headers_mut() {
            h.reserve(target.headers.len());
            for (name, value) in &target.headers {
                h.insert(name, value.clone());
            }
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| UpError::Unreachable(e.to_string()))?;
        let resp = tokio::time::timeout(p.timeout, self.http.request(req))
            .await
            .map_err(|_| UpError::Timeout(p.timeout))?
            .map_err(|e| UpError::Unreachable(error_chain(&e)))?;
        let status = resp.status();
        if status.is_redirection() {
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .map(str::to_string);
            return Err(UpError::Redirected(status, location));
        }
        if stream && status.is_success() {
            let s = BodyDataStream::new(resp.into_body()).map(|r| r.map_err(|e| error_chain(&e)));
            return Ok(UpResponse {
                status,
                body: UpBody::Stream(Box::pin(s)),
            });
        }
        let bytes = tokio::time::timeout(p.timeout, read_whole(resp, status, p.max_answer_bytes))
            .await
            .map_err(|_| UpError::Timeout(p.timeout))??;
        Ok(UpResponse {
            status,
            body: UpBody::Full(bytes),
        })
    }

    async fn simulate(
        &self,
        sim: &Simulator,
        p: &Provider,
        ep: Endpoint,
        body: &[u8],
    ) -> Result<UpResponse, UpError> {
        let latency = Duration::from_millis(sim.settings.latency_ms);
        if latency >= p.timeout {
            tokio::time::sleep(p.timeout).await;
            return Err(UpError::Timeout(p.timeout));
        }
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) else {
            return Err(UpError::Unreachable(
                "the request body is not a JSON object".into(),
            ));
        };
        let answer = match ep {
            Endpoint::Embeddings => sim.embeddings(&map),
            _ => sim.chat(ep.dialect(), &map),
        };
        Ok(match answer {
            SimAnswer::Full { status, body } => UpResponse {
                status,
                body: UpBody::Full(body),
            },
            SimAnswer::Stream { events, delay } => UpResponse {
                status: StatusCode::OK,
                body: UpBody::Stream(Box::pin(crate::sim::event_stream(events, delay))),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::http::HeaderMap;
    use axum::http::Uri;
    use bursar_core::providers::{DisconnectPolicy, SimSettings};
    use parking_lot::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn provider(kind: ProviderKind, base_url: &str, api_key_env: Option<&str>) -> Provider {
        Provider {
            name: "up".into(),
            kind,
            base_url: base_url.into(),
            api_key_env: api_key_env.map(str::to_string),
            serves: vec![],
            models: vec![],
            timeout: Duration::from_secs(5),
            max_retries: 0,
            on_disconnect: DisconnectPolicy::default(),
            circuit_failures: 5,
            circuit_open_ms: 1000,
            max_answer_bytes: 1 << 20,
            simulate: SimSettings::default(),
        }
    }

    /// Upstreams for `p` alone, with no outbound proxy whatever the environment says.
    fn upstreams(p: &Provider) -> Upstreams {
        upstreams_via(p, Matcher::builder().build())
    }

    fn upstreams_via(p: &Provider, proxies: Matcher) -> Upstreams {
        upstreams_trusting(p, proxies, Vec::new())
    }

    fn upstreams_trusting(
        p: &Provider,
        proxies: Matcher,
        extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    ) -> Upstreams {
        Upstreams::with_egress(
            &Routing {
                providers: vec![p.clone()],
                ..Routing::default()
            },
            proxies,
            extra_roots,
        )
    }

    /// Serves `router` on a free local port; its address.
    async fn serve(router: axum::Router) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    }

    /// `user:pass` in a Basic credential.
    const USER_PASS: &str = "Basic dXNlcjpwYXNz";

    /// A whole answer's body.
    fn whole(r: UpResponse) -> Bytes {
        let UpBody::Full(answer) = r.body else {
            panic!("a whole answer was asked for")
        };
        answer
    }

    /// Why a call of `p` through `up` could not reach it.
    async fn unreachable(up: &Upstreams, p: &Provider) -> String {
        match up
            .send(p, Endpoint::Chat, Bytes::from_static(b"{}"), false)
            .await
        {
            Err(UpError::Unreachable(why)) => why,
            r => panic!("{:?}", r.err()),
        }
    }

    #[tokio::test]
    async fn an_openai_compatible_provider_gets_its_key_as_a_bearer_token_and_the_body_as_sent() {
        let seen: Arc<Mutex<Option<(HeaderMap, Bytes)>>> = Arc::default();
        let kept = seen.clone();
        let router = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| async move {
                *kept.lock() = Some((headers, body));
                (StatusCode::CREATED, "{\"answer\":1}")
            }),
        );
        let url = format!("http://{}", serve(router).await);
        // Only this test reads this variable.
        std::env::set_var("BURSAR_TEST_UPSTREAM_KEY", "sk-upstream-test");
        let p = provider(ProviderKind::Openai, &url, Some("BURSAR_TEST_UPSTREAM_KEY"));
        let up = upstreams(&p);
        for _ in 0..2 {
            let body = Bytes::from_static(b"{\"model\":\"m\",  \"n\":1}");
            let r = up
                .send(&p, Endpoint::Chat, body.clone(), false)
                .await
                .unwrap();
            assert_eq!(r.status, StatusCode::CREATED);
            assert_eq!(&whole(r)[..], b"{\"answer\":1}");
            let (headers, sent) = seen.lock().take().unwrap();
            assert_eq!(sent, body, "the body goes as written");
            let header = |n: &str| {
                headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            assert_eq!(
                header("authorization").as_deref(),
                Some("Bearer sk-upstream-test")
            );
            assert_eq!(header("content-type").as_deref(), Some("application/json"));
            assert_eq!(
                header("host"),
                Some(url.trim_start_matches("http://").to_string())
            );
            assert_eq!(header("x-api-key"), None);
            assert_eq!(header("anthropic-version"), None);
        }
    }

    /// An `https://` provider is spoken to in TLS: what reaches its address first is a
    /// TLS handshake record (content type 22, version 3.x), not an HTTP request.
    #[tokio::test]
    async fn an_https_provider_is_spoken_to_over_tls() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let first = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 3];
            conn.read_exact(&mut head).await.unwrap();
            head
        });
        let p = provider(ProviderKind::Openai, &format!("https://{addr}"), None);
        let r = upstreams(&p)
            .send(&p, Endpoint::Chat, Bytes::new(), false)
            .await;
        assert!(matches!(r, Err(UpError::Unreachable(_))), "{:?}", r.err());
        let head = first.await.unwrap();
        assert_eq!(head[0], 22, "a handshake record: {head:?}");
        assert_eq!(head[1], 3, "TLS: {head:?}");
    }

    #[tokio::test]
    async fn a_provider_that_cannot_be_reached_is_told_with_the_cause() {
        // A port just freed: nothing listens there.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let p = provider(ProviderKind::Openai, &format!("http://{addr}"), None);
        let why = unreachable(&upstreams(&p), &p).await;
        assert!(why.contains("refused"), "{why}");

        let p = provider(ProviderKind::Openai, "ftp://127.0.0.1", None);
        let why = unreachable(&upstreams(&p), &p).await;
        assert!(why.contains("not a valid http:// or https:// URL"), "{why}");
    }

    /// An `http://` provider behind a forwarding proxy: the request goes to the proxy,
    /// in absolute form, with the proxy's credentials and the provider's key; the
    /// provider's own address (which does not resolve) is never dialled.
    #[tokio::test]
    async fn an_http_provider_behind_a_proxy_is_reached_through_it_with_its_credentials() {
        let seen: Arc<Mutex<Vec<(String, HeaderMap)>>> = Arc::default();
        let kept = seen.clone();
        let proxy = serve(axum::Router::new().fallback(
            move |uri: Uri, headers: HeaderMap| async move {
                kept.lock().push((uri.to_string(), headers));
                "{\"via\":\"proxy\"}"
            },
        ))
        .await;
        std::env::set_var("BURSAR_TEST_PROXIED_KEY", "sk-proxied");
        let p = provider(
            ProviderKind::Openai,
            "http://provider.invalid:8000",
            Some("BURSAR_TEST_PROXIED_KEY"),
        );
        let proxies = Matcher::builder()
            .http(format!("http://user:pass@{proxy}"))
            .build();
        let up = upstreams_via(&p, proxies);
        for _ in 0..2 {
            let r = up
                .send(&p, Endpoint::Chat, Bytes::from_static(b"{}"), false)
                .await
                .unwrap();
            assert_eq!(&whole(r)[..], b"{\"via\":\"proxy\"}");
        }
        let seen = seen.lock();
        assert_eq!(seen.len(), 2);
        for (uri, headers) in seen.iter() {
            assert_eq!(uri, "http://provider.invalid:8000/v1/chat/completions");
            let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
            assert_eq!(header("proxy-authorization"), Some(USER_PASS));
            assert_eq!(header("authorization"), Some("Bearer sk-proxied"));
            assert_eq!(header("host"), Some("provider.invalid:8000"));
        }
    }

    /// An `https://` provider behind a proxy: a `CONNECT` to the provider's host, with
    /// the proxy's credentials, then TLS inside the tunnel (the proxy sees a handshake,
    /// not the request).
    #[tokio::test]
    async fn an_https_provider_behind_a_proxy_is_tunnelled_to_then_spoken_to_in_tls() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let seen = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                conn.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .unwrap();
            let mut tls = [0u8; 3];
            conn.read_exact(&mut tls).await.unwrap();
            (String::from_utf8(head).unwrap(), tls)
        });
        let p = provider(ProviderKind::Openai, "https://api.provider.invalid", None);
        let proxies = Matcher::builder()
            .https(format!("http://user:pass@{proxy}"))
            .build();
        let r = upstreams_via(&p, proxies)
            .send(&p, Endpoint::Chat, Bytes::from_static(b"{}"), false)
            .await;
        assert!(matches!(r, Err(UpError::Unreachable(_))), "{:?}", r.err());
        let (head, tls) = seen.await.unwrap();
        assert!(
            head.starts_with("CONNECT api.provider.invalid:443 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase().contains(&format!(
                "proxy-authorization: {}",
                USER_PASS.to_ascii_lowercase()
            )),
            "{head}"
        );
        assert_eq!(tls[0], 22, "a TLS handshake record: {tls:?}");
        assert_eq!(tls[1], 3, "{tls:?}");
    }

    /// `NO_PROXY` sends a provider straight; a SOCKS proxy is refused, saying so.
    #[tokio::test]
    async fn no_proxy_goes_straight_and_a_socks_proxy_is_refused() {
        let provider_addr = serve(axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(|| async { "{\"via\":\"straight\"}" }),
        ))
        .await;
        let p = provider(
            ProviderKind::Openai,
            &format!("http://{provider_addr}"),
            None,
        );
        // Nothing listens at the proxy's address.
        let proxies = Matcher::builder()
            .http("http://127.0.0.1:9")
            .no("127.0.0.1")
            .build();
        let r = upstreams_via(&p, proxies)
            .send(&p, Endpoint::Chat, Bytes::from_static(b"{}"), false)
            .await
            .unwrap();
        assert_eq!(&whole(r)[..], b"{\"via\":\"straight\"}");

        let proxies = Matcher::builder().all("socks5://127.0.0.1:9").build();
        let why = unreachable(&upstreams_via(&p, proxies), &p).await;
        assert!(why.contains("`socks5` is not supported"), "{why}");
    }

    /// An `https://` provider whose certificate a private authority signed
    /// (`testdata/ca.pem`; for `127.0.0.1` and `localhost`, valid until 2126). Every
    /// request it reads whole is answered `{"via":"tls"}`.
    async fn provider_of_a_private_ca() -> std::net::SocketAddr {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_slice_iter(include_bytes!("testdata/provider.pem"))
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(include_bytes!("testdata/provider.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                // A client that does not trust the authority ends the handshake.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    if tls.read_exact(&mut byte).await.is_err() {
                        break;
                    }
                    head.push(byte[0]);
                }
                let body = b"{\"via\":\"tls\"}";
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.write_all(body).await;
                let _ = tls.shutdown().await;
            }
        });
        addr
    }

    /// A provider behind a private certificate authority: refused as unknown with
    /// Mozilla's roots alone, reached once the authority's certificate is trusted
    /// (what `SSL_CERT_FILE` names, read by `read_roots`).
    #[tokio::test]
    async fn a_provider_of_a_private_authority_is_trusted_once_its_certificate_is_given() {
        let addr = provider_of_a_private_ca().await;
        let p = provider(ProviderKind::Openai, &format!("https://{addr}"), None);
        let why = unreachable(&upstreams(&p), &p).await;
        assert!(why.contains("UnknownIssuer"), "{why}");

        let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/proxy/testdata/ca.pem");
        let roots = egress::read_roots(&ca).unwrap();
        assert_eq!(roots.len(), 1);
        let up = upstreams_trusting(&p, Matcher::builder().build(), roots);
        let r = up
            .send(&p, Endpoint::Chat, Bytes::from_static(b"{}"), false)
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&whole(r)[..], b"{\"via\":\"tls\"}");
    }

    /// A certificate file that is missing, or holds no certificate, is refused naming it.
    #[test]
    fn a_certificate_file_without_certificates_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let why = egress::read_roots(&missing).unwrap_err();
        assert!(why.contains("missing.pem"), "{why}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let why = egress::read_roots(&empty).unwrap_err();
        assert!(
            why.contains("empty.pem") && why.contains("no PEM certificate"),
            "{why}"
        );
    }
}
