//! Outgoing HTTP for plugins granted it: host patterns, the allow-list check
//! and the limits armed around every request.
//!
//! A plugin may import `wasi:http/outgoing-handler` (wasmtime-wasi-http). The
//! linker always provides it, but:
//!
//! - a plugin that imports it without an HTTP grant is refused at load
//!   ([`imports_outgoing_http`] is how the loader tells);
//! - every request passes [`HttpHooks::send_request`] first: without a grant,
//!   or to a scheme, host or port no pattern of the grant covers, it fails in
//!   the plugin with `error-code.HTTP-request-denied`, is logged with the
//!   allow-list, and counts in `setpoint_plugin_http_denied_total`;
//! - an allowed request gets the grant's timeout for connecting, for the
//!   response head and for every gap in the body, never more than what is
//!   left of the current call's `max-reconcile-time` (so requests in a row
//!   cannot outlast the call either), and a body longer than
//!   `max-response-bytes` fails with `error-code.HTTP-response-body-size`.
//!
//! Patterns are `host`, `host:port`, `scheme://host[:port]` or `*.domain`
//! (any subdomain of `domain`, not `domain` itself). Without a port a pattern
//! allows every port; without a scheme, both `http` and `https`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use super::imports::HostContext;
use super::settings::HttpGrant;

/// The label of `setpoint_plugin_http_denied_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabel {
    pub plugin: String,
}

/// Requests refused by the allow-list, by plugin.
pub type DeniedCounter = Family<DeniedLabel, Counter>;

/// The interface whose import makes a component need an HTTP grant.
const OUTGOING_HANDLER: &str = "wasi:http/outgoing-handler";

/// True if a component imports `wasi:http/outgoing-handler` (any 0.2.x).
pub fn imports_outgoing_http(
    component: &wasmtime::component::Component,
    engine: &wasmtime::Engine,
) -> bool {
    component
        .component_type()
        .imports(engine)
        .any(|(name, _)| name.split('@').next() == Some(OUTGOING_HANDLER))
}

/// One entry of an allow-list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPattern {
    /// `http` or `https`; `None`: either.
    scheme: Option<String>,
    /// A host name or address, lower case, or `*.domain`.
    host: String,
    /// `None`: any port.
    port: Option<u16>,
}

impl HostPattern {
    /// Parse `host`, `host:port`, `scheme://host[:port]` or `*.domain`.
    pub fn parse(text: &str) -> Result<HostPattern, String> {
        let bad = |why: &str| {
            Err(format!(
                "`{}` is not a host pattern: {why}. Write `host`, `host:port`, \
                 `https://host[:port]` or `*.domain`",
                short(text)
            ))
        };
        let (scheme, rest) = match text.split_once("://") {
            Some((s, rest)) => {
                let s = s.to_ascii_lowercase();
                if s != "http" && s != "https" {
                    return bad("the scheme must be http or https");
                }
                (Some(s), rest)
            }
            None => (None, text),
        };
        if rest.contains('/') || rest.contains('?') || rest.contains('@') {
            return bad("a pattern names a host, not a URL path or user");
        }
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 address without a port, `[::1]`, has colons inside brackets.
            Some((h, p)) if !p.contains(']') => match p.parse::<u16>() {
                Ok(port) => (h, Some(port)),
                Err(_) => return bad("the port must be a number from 0 to 65535"),
            },
            _ => (rest, None),
        };
        let host = host.to_ascii_lowercase();
        let name = host.strip_prefix("*.").unwrap_or(&host);
        if name.is_empty() || name.contains('*') {
            return bad("the host is empty, or has a `*` other than a leading `*.`");
        }
        Ok(HostPattern { scheme, host, port })
    }

    fn host_matches(&self, host: &str) -> bool {
        match self.host.strip_prefix("*.") {
            Some(domain) => host
                .strip_suffix(domain)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => self.host == host,
        }
    }

    /// True if a request to `scheme://host:port` is allowed by this pattern.
    pub fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        self.scheme.as_deref().is_none_or(|s| s == scheme)
            && self.port.is_none_or(|p| p == port)
            && self.host_matches(&host.to_ascii_lowercase())
    }

    /// True if everything `other` allows, this allows too.
    pub fn covers(&self, other: &HostPattern) -> bool {
        let scheme = match (&self.scheme, &other.scheme) {
            (None, _) => true,
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
        };
        let port = match (self.port, other.port) {
            (None, _) => true,
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
        };
        let host = match other.host.strip_prefix("*.") {
            // A wildcard is covered by a wildcard of the same or a parent domain.
            Some(domain) => {
                self.host == other.host
                    || self
                        .host
                        .strip_prefix("*.")
                        .is_some_and(|d| domain.ends_with(&format!(".{d}")))
            }
            None => self.host_matches(&other.host),
        };
        scheme && port && host
    }
}

/// At most 60 characters of what a user wrote, for messages.
fn short(text: &str) -> String {
    match text.char_indices().nth(60) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// An HTTP grant, parsed, with the per-request limits in effect.
#[derive(Clone, Debug)]
pub struct HttpPolicy {
    hosts: Vec<HostPattern>,
    timeout: Duration,
    max_response_bytes: u64,
}

impl HttpPolicy {
    /// The policy for `grant`, with its timeout capped at `max_call_time`.
    pub fn new(grant: &HttpGrant, max_call_time: Duration) -> Result<Self, String> {
        Ok(Self {
            hosts: grant
                .hosts
                .iter()
                .map(|h| HostPattern::parse(h))
                .collect::<Result<_, _>>()?,
            timeout: grant.timeout.min(max_call_time),
            max_response_bytes: grant.max_response_bytes,
        })
    }

    /// True if a request to `uri` is allowed.
    fn allows(&self, uri: &http::Uri) -> bool {
        let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
        let Some(host) = uri.host() else {
            return false;
        };
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "http" { 80 } else { 443 });
        self.hosts.iter().any(|p| p.allows(&scheme, host, port))
    }
}

/// The hooks every plugin `Store` carries: what its requests may reach.
pub struct HttpHooks {
    /// `None`: nothing may be sent.
    pub policy: Option<Arc<HttpPolicy>>,
    /// Whose requests these are (its name labels denials).
    pub host: Arc<HostContext>,
    pub denied: DeniedCounter,
    /// When the current call's `max-reconcile-time` runs out: no request
    /// may outlast it (set before every call of a plugin granted HTTP).
    pub call_ends: Option<tokio::time::Instant>,
}

type Sent = Result<(
    http::Response<WasiBody>,
    Box<dyn Future<Output = Result<(), HttpError>> + Send>,
)>;

type Result<T, E = HttpError> = std::result::Result<T, E>;

impl WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<()>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        drop(fut);
        let policy = match &self.policy {
            Some(policy) if policy.allows(request.uri()) => policy.clone(),
            _ => {
                self.denied
                    .get_or_create(&DeniedLabel {
                        plugin: self.host.plugin.clone(),
                    })
                    .inc();
                tracing::warn!(
                    plugin = %self.host.plugin,
                    uri = %short(&request.uri().to_string()),
                    allowed = ?self.policy.as_ref().map(|p| &p.hosts),
                    "outgoing HTTP request denied: its host is not in the plugin's HTTP grant"
                );
                return Box::new(async { Err(HttpError::HttpRequestDenied) });
            }
        };
        // The grant's timeout, or what is left of the call's time if less: a
        // plugin waiting on HTTP runs no Wasm, so the epoch deadline cannot
        // stop it, and several requests in a row must not outlast the call.
        let timeout = self.call_ends.map_or(policy.timeout, |end| {
            end.saturating_duration_since(tokio::time::Instant::now())
                .min(policy.timeout)
        });
        if timeout.is_zero() {
            return Box::new(async { Err(HttpError::HttpResponseTimeout) });
        }
        let cap = |asked: Option<Duration>| Some(asked.map_or(timeout, |t| t.min(timeout)));
        let options = options.unwrap_or_default();
        let options = RequestOptions {
            connect_timeout: cap(options.connect_timeout),
            first_byte_timeout: cap(options.first_byte_timeout),
            between_bytes_timeout: cap(options.between_bytes_timeout),
        };
        Box::new(async move {
            install_crypto_provider();
            let head = wasmtime_wasi_http::default_send_request(request, Some(options));
            let (response, io) = tokio::time::timeout(timeout, head)
                .await
                .map_err(|_| HttpError::ConnectionReadTimeout)??;
            let limit = policy.max_response_bytes;
            // A declared length over the limit fails the response itself, so
            // the plugin gets `HTTP-response-body-size` as an error code; a
            // body without one fails when it grows past the limit (as text:
            // wasmtime-wasi-http 48 hands body errors to the guest as an
            // `io-error` without a code).
            let declared = response
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if declared.is_some_and(|n| n > limit) {
                return Err(HttpError::HttpResponseBodySize(declared));
            }
            let response = response.map(|body| limited(body, limit));
            Ok((
                response,
                Box::new(io) as Box<dyn Future<Output = Result<()>> + Send>,
            ))
        })
    }
}

/// `body`, failing with `HTTP-response-body-size` past `limit` bytes.
fn limited<B>(body: B, limit: u64) -> WasiBody
where
    B: http_body::Body<Data = Bytes, Error = HttpError> + Send + 'static,
{
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    http_body_util::Limited::new(body, limit_usize)
        .map_err(move |e| match e.downcast::<HttpError>() {
            Ok(e) => *e,
            Err(_) => HttpError::HttpResponseBodySize(Some(limit)),
        })
        .boxed_unsync()
}

/// wasmtime-wasi-http's TLS client takes rustls's process-wide provider, which
/// must be chosen once when more than one is compiled in (the OCI client brings
/// another): choose `ring`, the one wasmtime-wasi-http is built with.
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: a provider was installed already, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> HostPattern {
        HostPattern::parse(text).unwrap()
    }

    #[test]
    fn patterns_allow_what_they_name() {
        assert!(p("api.example.com").allows("https", "API.example.com", 443));
        assert!(p("api.example.com").allows("http", "api.example.com", 8080));
        assert!(!p("api.example.com").allows("https", "example.com", 443));
        assert!(!p("api.example.com").allows("https", "api.example.com.evil.io", 443));
        assert!(p("127.0.0.1:8080").allows("http", "127.0.0.1", 8080));
        assert!(!p("127.0.0.1:8080").allows("http", "127.0.0.1", 8081));
        assert!(p("https://api.example.com").allows("https", "api.example.com", 443));
        assert!(!p("https://api.example.com").allows("http", "api.example.com", 80));
        assert!(p("*.example.com").allows("https", "a.b.example.com", 443));
        assert!(!p("*.example.com").allows("https", "example.com", 443));
        assert!(!p("*.example.com").allows("https", "badexample.com", 443));
        assert!(p("[::1]:9000").allows("http", "[::1]", 9000));
    }

    #[test]
    fn a_pattern_covers_only_narrower_ones() {
        assert!(p("*.example.com").covers(&p("https://api.example.com:443")));
        assert!(p("*.example.com").covers(&p("*.eu.example.com")));
        assert!(!p("*.eu.example.com").covers(&p("*.example.com")));
        assert!(p("example.com").covers(&p("http://example.com:80")));
        assert!(!p("https://example.com").covers(&p("example.com")));
        assert!(!p("example.com:443").covers(&p("example.com")));
        assert!(!p("a.example.com").covers(&p("*.example.com")));
    }

    #[test]
    fn bad_patterns_say_what_to_write() {
        for bad in [
            "",
            "ftp://example.com",
            "example.com/path",
            "example.com:http",
            "*",
            "a.*.com",
        ] {
            let err = HostPattern::parse(bad).unwrap_err();
            assert!(err.contains("`host:port`"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_tls_client_config_can_be_built_once_the_provider_is_chosen() {
        // rustls is built with two providers here (ring for wasmtime-wasi-http,
        // aws-lc-rs for the OCI client's reqwest); without a process default,
        // wasmtime-wasi-http's `ClientConfig::builder()` panics on the first
        // https request.
        install_crypto_provider();
        let roots = rustls::RootCertStore::empty();
        let _config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
    }

    #[test]
    fn the_policy_checks_scheme_host_and_default_port() {
        let grant = HttpGrant {
            hosts: vec!["http://127.0.0.1:8080".into(), "api.example.com".into()],
            ..HttpGrant::default()
        };
        let policy = HttpPolicy::new(&grant, Duration::from_secs(1)).unwrap();
        let allows = |uri: &str| policy.allows(&uri.parse().unwrap());
        assert!(allows("http://127.0.0.1:8080/hook"));
        assert!(!allows("https://127.0.0.1:8080/hook"));
        assert!(!allows("http://127.0.0.1:9090/hook"));
        assert!(allows("https://api.example.com/v1"));
        assert!(!allows("https://api.example.org/v1"));
        assert_eq!(
            policy.timeout,
            Duration::from_secs(1),
            "capped by the call's limit"
        );
    }
}
