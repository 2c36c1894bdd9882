//! Outgoing HTTP, for plugins the operator grants it.
//!
//! A plugin that calls HTTP APIs is exported with
//! `setpoint_sdk::export!(Type, http)`, lists the hosts it calls in its
//! manifest, and sends requests through [`Host::http`](crate::Host::http):
//!
//! ```toml
//! # NAME.toml, beside NAME.wasm
//! [capabilities.http]
//! hosts = ["api.example.com"]
//! ```
//!
//! ```ignore
//! let response = host.http(&http::Request::get("https://api.example.com/v1/things/a"))?;
//! if response.status == 404 { /* create it */ }
//! ```
//!
//! The host sends only to hosts the operator granted (`[grants.NAME] http =
//! { hosts = [...] }`); anything else fails with [`HttpError::Denied`]. It
//! also bounds each request's time ([`HttpError::Timeout`]) and response size
//! ([`HttpError::TooLarge`]). A component exported with `http` imports
//! `wasi:http/outgoing-handler`, so it loads only where HTTP is granted; one
//! exported without it has no HTTP client at all. (A choice at the export, not
//! a cargo feature: cargo unifies features across a workspace, so a feature
//! would give every plugin built beside an HTTP one the import.)
//!
//! In native tests, [`FakeHost::on_http`](crate::testing::FakeHost::on_http)
//! answers the requests.
//!
//! `?` turns an [`HttpError`] into a reconcile [`Error`](crate::Error):
//! a denied request or a bad URL is fatal (retrying does not help until the
//! object or the grant changes); the rest are retried with back-off.

use std::fmt;

/// One request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// `http://` or `https://` URL.
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// A request with no headers and no body.
    pub fn new(method: &str, url: &str) -> Self {
        Self {
            method: method.to_ascii_uppercase(),
            url: url.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn get(url: &str) -> Self {
        Self::new("GET", url)
    }

    pub fn put(url: &str) -> Self {
        Self::new("PUT", url)
    }

    pub fn post(url: &str) -> Self {
        Self::new("POST", url)
    }

    pub fn delete(url: &str) -> Self {
        Self::new("DELETE", url)
    }

    /// Add a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// A JSON body, with its content type.
    pub fn json(self, body: &serde_json::Value) -> Self {
        let mut request = self.header("content-type", "application/json");
        request.body = body.to_string().into_bytes();
        request
    }

    /// The URL split into scheme, authority and path with query.
    pub fn parts(&self) -> Result<(&str, &str, &str), HttpError> {
        let invalid = || HttpError::InvalidUrl(self.url.clone());
        let (scheme, rest) = self.url.split_once("://").ok_or_else(invalid)?;
        if scheme != "http" && scheme != "https" {
            return Err(invalid());
        }
        let at = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(at);
        if authority.is_empty() {
            return Err(invalid());
        }
        Ok((scheme, authority, if path.is_empty() { "/" } else { path }))
    }
}

/// A response, read whole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// 200–299.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// 500–599: the server failed; worth retrying.
    pub fn is_server_error(&self) -> bool {
        (500..600).contains(&self.status)
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// Why a request got no response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// The host refused it: the URL's host is not in this plugin's grant.
    Denied(String),
    /// It took longer than the host allows.
    Timeout,
    /// The response body was larger than the host allows.
    TooLarge,
    /// Not an `http://` or `https://` URL with a host.
    InvalidUrl(String),
    /// This plugin has no outgoing HTTP (exported without `http`, or a test
    /// host without a handler).
    Unavailable,
    /// Anything else: the connection failed, DNS, TLS ...
    Failed(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Denied(url) => write!(
                f,
                "the host denied the request to {url}: its host is not in this plugin's HTTP \
                 grant (list it in the manifest's [capabilities.http] hosts, and ask the \
                 operator to grant it)"
            ),
            HttpError::Timeout => write!(f, "the request timed out"),
            HttpError::TooLarge => write!(f, "the response body is larger than the host allows"),
            HttpError::InvalidUrl(url) => write!(f, "`{url}` is not an http(s) URL with a host"),
            HttpError::Unavailable => write!(
                f,
                "outgoing HTTP is not available: export the plugin with \
                 `setpoint_sdk::export!(Type, http)`"
            ),
            HttpError::Failed(why) => write!(f, "the request failed: {why}"),
        }
    }
}

impl std::error::Error for HttpError {}

impl From<HttpError> for crate::Error {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Denied(_) | HttpError::InvalidUrl(_) | HttpError::Unavailable => {
                crate::Error::fatal(e)
            }
            _ => crate::Error::retry(e),
        }
    }
}

/// The request sent through the component's `wasi:http/outgoing-handler`.
#[cfg(target_arch = "wasm32")]
pub(crate) fn send(request: &Request) -> Result<Response, HttpError> {
    use wasip2::http::types::{
        ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme,
    };
    use wasip2::io::streams::StreamError;

    let failed = |e: ErrorCode| match e {
        ErrorCode::HttpRequestDenied => HttpError::Denied(request.url.clone()),
        ErrorCode::ConnectionTimeout
        | ErrorCode::ConnectionReadTimeout
        | ErrorCode::ConnectionWriteTimeout
        | ErrorCode::HttpResponseTimeout => HttpError::Timeout,
        ErrorCode::HttpResponseBodySize(_) => HttpError::TooLarge,
        other => HttpError::Failed(format!("{other:?}")),
    };
    let (scheme, authority, path) = request.parts()?;
    let headers = Fields::new();
    for (name, value) in &request.headers {
        headers
            .append(name, value.as_bytes())
            .map_err(|e| HttpError::Failed(format!("header {name}: {e:?}")))?;
    }
    let outgoing = OutgoingRequest::new(headers);
    let method = match request.method.as_str() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        "OPTIONS" => Method::Options,
        other => Method::Other(other.to_string()),
    };
    let invalid = |_| HttpError::InvalidUrl(request.url.clone());
    outgoing.set_method(&method).map_err(invalid)?;
    let scheme = if scheme == "https" {
        Scheme::Https
    } else {
        Scheme::Http
    };
    outgoing.set_scheme(Some(&scheme)).map_err(invalid)?;
    outgoing.set_authority(Some(authority)).map_err(invalid)?;
    outgoing.set_path_with_query(Some(path)).map_err(invalid)?;
    let body = outgoing
        .body()
        .map_err(|_| HttpError::Failed("the request body was taken twice".into()))?;
    let future = wasip2::http::outgoing_handler::handle(outgoing, None).map_err(failed)?;
    {
        let stream = body
            .write()
            .map_err(|_| HttpError::Failed("the request body stream was taken twice".into()))?;
        for chunk in request.body.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| HttpError::Failed(format!("writing the request body: {e:?}")))?;
        }
    }
    OutgoingBody::finish(body, None).map_err(failed)?;
    future.subscribe().block();
    let response = match future.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(e))) => return Err(failed(e)),
        Some(Err(())) | None => {
            return Err(HttpError::Failed("the response was already taken".into()));
        }
    };
    let headers = response
        .headers()
        .entries()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect();
    let status = response.status();
    let incoming = response
        .consume()
        .map_err(|_| HttpError::Failed("the response body was taken twice".into()))?;
    let mut bytes = Vec::new();
    {
        let stream = incoming
            .stream()
            .map_err(|_| HttpError::Failed("the response body was taken twice".into()))?;
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(match wasip2::http::types::http_error_code(&e) {
                        Some(code) => failed(code),
                        None => body_error(e.to_debug_string()),
                    });
                }
            }
        }
    }
    drop(IncomingBody::finish(incoming));
    Ok(Response {
        status,
        headers,
        body: bytes,
    })
}

/// A body read that failed without an error code (wasmtime 48's host passes
/// these as text), classified by its text.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
fn body_error(text: String) -> HttpError {
    if text.contains("body size exceeds limit") {
        HttpError::TooLarge
    } else if text.contains("timeout") || text.contains("timed out") {
        HttpError::Timeout
    } else {
        HttpError::Failed(text)
    }
}

/// Natively there is no WASI HTTP client (tests use `FakeHost::on_http`).
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn send(_request: &Request) -> Result<Response, HttpError> {
    Err(HttpError::Unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        let r = Request::get("http://127.0.0.1:8080/records/a?x=1");
        assert_eq!(
            r.parts().unwrap(),
            ("http", "127.0.0.1:8080", "/records/a?x=1")
        );
        assert_eq!(
            Request::get("https://api.example.com").parts().unwrap(),
            ("https", "api.example.com", "/")
        );
        for bad in ["ftp://x/y", "api.example.com/x", "http:///x"] {
            assert_eq!(
                Request::get(bad).parts(),
                Err(HttpError::InvalidUrl(bad.into()))
            );
        }
    }

    #[test]
    fn a_body_error_without_a_code_is_classified_by_its_text() {
        assert_eq!(
            body_error("HTTP response body size exceeds limit: 65536 bytes".into()),
            HttpError::TooLarge
        );
        assert_eq!(
            body_error("connection read timeout".into()),
            HttpError::Timeout
        );
        assert_eq!(
            body_error("reset".into()),
            HttpError::Failed("reset".into())
        );
    }

    #[test]
    fn denied_is_fatal_and_a_timeout_is_retried() {
        let denied: crate::Error = HttpError::Denied("http://evil/".into()).into();
        assert_eq!(denied.kind, crate::ErrorKind::Fatal);
        assert!(denied.message.contains("not in this plugin's HTTP grant"));
        let timeout: crate::Error = HttpError::Timeout.into();
        assert_eq!(timeout.kind, crate::ErrorKind::Retry);
    }
}
