//! The command line's client of the HTTP API: `setpoint apply`, `get`,
//! `delete`, `status` and `wait` talk to a running daemon through it.

use std::time::Duration;

use anyhow::{Context, bail};

/// A client of one daemon's API.
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// An answer: status code and body.
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("the API answered something that is not JSON: {}", self.body))
    }
}

impl Client {
    pub fn new(server: &str, token: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .into();
        Self {
            base: server.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    /// Send a request; `body` is (content type, bytes). Answers 2xx as `Ok`; any
    /// other status fails with the server's message.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<Answer> {
        let answer = self.send(method, path, body)?;
        if !(200..300).contains(&answer.status) {
            bail!("{}", error_message(&answer));
        }
        Ok(answer)
    }

    /// Like [`call`](Self::call), but any status is returned.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<Answer> {
        let url = format!("{}{path}", self.base);
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Accept", "application/json");
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let result = match body {
            Some((content_type, bytes)) => self
                .agent
                .run(request.header("Content-Type", content_type).body(bytes)?),
            None => self.agent.run(request.body(())?),
        };
        let mut response = result.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the Setpoint API at {}: {e}. Is `setpoint run` running there? \
                 Point --server (or SETPOINT_SERVER) at it",
                self.base
            )
        })?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .context("cannot read the API's answer")?;
        Ok(Answer { status, body })
    }
}

/// The `error` of a JSON refusal, or the body as it is.
fn error_message(answer: &Answer) -> String {
    let message = serde_json::from_str::<serde_json::Value>(&answer.body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| answer.body.trim().to_string());
    format!("the API refused ({}): {message}", answer.status)
}

/// `?a=b&c=d` from the pairs whose value is set, percent-encoded.
pub fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encodes_values_and_skips_unset_ones() {
        assert_eq!(
            query(&[("selector", Some("app=web,tier=db")), ("namespace", None)]),
            "?selector=app%3Dweb%2Ctier%3Ddb"
        );
        assert_eq!(query(&[("namespace", None)]), "");
    }
}
