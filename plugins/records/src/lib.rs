//! `records`: keeps one JSON document per `Record` object on an HTTP API, the
//! example of a plugin granted outgoing HTTP.
//!
//! A `Record`'s spec names the collection's URL (`endpoint`) and the document
//! (`data`); the document lives at `{endpoint}/{namespace or _}/{name}`.
//! Each reconcile reads it back (GET): when it is missing it is created (PUT),
//! when it differs from `data` the difference is reported as drift and it is
//! replaced (PUT), and when it matches nothing is sent. Deleting the object
//! deletes the document (DELETE; a 404 counts as gone).
//!
//! A 5xx answer, a timeout or a failed connection is retried with the host's
//! back-off; a 4xx answer or a request the host denies (its host is not
//! granted) is fatal until the object changes.
//!
//! Exported with `export!(Records, http)`, the component imports
//! `wasi:http/outgoing-handler`, so its manifest asks for the hosts it calls
//! and the operator grants them:
//!
//! ```toml
//! [[plugin]]
//! path = "records.wasm"
//! [plugin.capabilities.http]
//! hosts = ["http://127.0.0.1:8080"]
//! [grants.records]
//! http = { hosts = ["http://127.0.0.1:8080"], timeout = "5s" }
//! ```

use serde::{Deserialize, Serialize};
use setpoint_sdk::http::{Request as HttpRequest, Response};
use setpoint_sdk::{Action, Error, Host, Info, Object, Outcome, Reconciler, Request};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The collection's URL, e.g. `http://127.0.0.1:8080/records`.
    pub endpoint: String,
    /// The document to keep there.
    pub data: serde_json::Value,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct Status {
    /// Where the document is.
    pub url: String,
    /// What the last reconcile did: `created`, `replaced` or `in-sync`.
    pub remote: String,
}

#[derive(Default)]
pub struct Records;

/// Where an object's document lives.
pub fn document_url(endpoint: &str, object: &Object) -> String {
    let namespace = if object.namespace.is_empty() {
        "_"
    } else {
        &object.namespace
    };
    format!(
        "{}/{namespace}/{}",
        endpoint.trim_end_matches('/'),
        object.name
    )
}

/// `Err` unless the answer is a success (or one of `also`): a 5xx is retried,
/// anything else is fatal.
fn expect(what: &str, response: &Response, also: &[u16]) -> Result<(), Error> {
    if response.is_success() || also.contains(&response.status) {
        return Ok(());
    }
    let message = format!("{what}: the server answered {}", response.status);
    if response.is_server_error() {
        Err(Error::retry(message))
    } else {
        Err(Error::fatal(message))
    }
}

impl Reconciler for Records {
    type Spec = Spec;
    type Status = Status;

    fn describe(&self) -> Info {
        Info::new("records", env!("CARGO_PKG_VERSION"), ["Record"])
    }

    fn reconcile(&self, host: &dyn Host, req: Request<Spec>) -> Result<Outcome<Status>, Error> {
        let url = document_url(&req.spec.endpoint, &req.object);
        if req.action == Action::Deleted || req.object.deleting {
            let answer = host.http(&HttpRequest::delete(&url))?;
            expect(&format!("DELETE {url}"), &answer, &[404])?;
            return Ok(Outcome::done());
        }
        let current = host.http(&HttpRequest::get(&url))?;
        expect(&format!("GET {url}"), &current, &[404])?;
        let remote = if current.status == 404 {
            "created"
        } else if current.json().ok().as_ref() == Some(&req.spec.data) {
            return Ok(Outcome::done().with_status(Status {
                url,
                remote: "in-sync".into(),
            }));
        } else {
            host.report_drift(&format!(
                "{url} holds {}, not the spec's data",
                String::from_utf8_lossy(&current.body)
                    .chars()
                    .take(80)
                    .collect::<String>()
            ));
            "replaced"
        };
        let put = host.http(&HttpRequest::put(&url).json(&req.spec.data))?;
        expect(&format!("PUT {url}"), &put, &[])?;
        Ok(Outcome::done().with_status(Status {
            url,
            remote: remote.into(),
        }))
    }
}

setpoint_sdk::export!(Records, http);

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::rc::Rc;

    use setpoint_sdk::ErrorKind;
    use setpoint_sdk::http::HttpError;
    use setpoint_sdk::testing::FakeHost;

    use super::*;

    fn record(data: serde_json::Value) -> Object {
        Object::new(
            "Record",
            "a",
            serde_json::json!({"endpoint": "http://api/records/", "data": data}),
        )
    }

    /// A fake API: documents by URL; `fail` answers that many 503s first.
    fn api(host: &FakeHost, fail: u32) -> Rc<RefCell<BTreeMap<String, Vec<u8>>>> {
        let docs: Rc<RefCell<BTreeMap<String, Vec<u8>>>> = Rc::default();
        let left = RefCell::new(fail);
        let store = docs.clone();
        host.on_http(move |r: &HttpRequest| {
            if *left.borrow() > 0 {
                *left.borrow_mut() -= 1;
                return Ok(Response {
                    status: 503,
                    ..Response::default()
                });
            }
            let mut docs = store.borrow_mut();
            let status = match r.method.as_str() {
                "GET" => match docs.get(&r.url) {
                    Some(body) => {
                        return Ok(Response {
                            status: 200,
                            body: body.clone(),
                            ..Response::default()
                        });
                    }
                    None => 404,
                },
                "PUT" => {
                    docs.insert(r.url.clone(), r.body.clone());
                    200
                }
                "DELETE" => docs.remove(&r.url).map_or(404, |_| 204),
                _ => 405,
            };
            Ok(Response {
                status,
                ..Response::default()
            })
        });
        docs
    }

    #[test]
    fn creates_then_finds_in_sync_then_replaces_drift_then_deletes() {
        let host = FakeHost::new();
        let docs = api(&host, 0);
        let obj = record(serde_json::json!({"v": 1}));
        host.reconcile(&Records, Action::Created, &obj).unwrap();
        let status = host.object("Record", "", "a").unwrap().status.unwrap();
        assert_eq!(status["remote"], "created");
        assert_eq!(status["url"], "http://api/records/_/a");
        host.reconcile(&Records, Action::Resynced, &obj).unwrap();
        let status = host.object("Record", "", "a").unwrap().status.unwrap();
        assert_eq!(status["remote"], "in-sync");
        assert!(host.drift().is_empty());
        docs.borrow_mut()
            .insert("http://api/records/_/a".into(), b"{\"v\":2}".to_vec());
        host.reconcile(&Records, Action::Resynced, &obj).unwrap();
        assert_eq!(host.drift().len(), 1, "{:?}", host.drift());
        assert_eq!(docs.borrow()["http://api/records/_/a"], b"{\"v\":1}");
        host.reconcile(&Records, Action::Deleted, &obj).unwrap();
        assert!(docs.borrow().is_empty());
        // A second delete finds nothing and still succeeds.
        host.reconcile(&Records, Action::Deleted, &obj).unwrap();
    }

    #[test]
    fn a_5xx_is_retried_and_a_denied_request_is_fatal() {
        let host = FakeHost::new();
        api(&host, 1);
        let obj = record(serde_json::json!({}));
        let err = host.reconcile(&Records, Action::Created, &obj).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Retry, "{}", err.message);
        assert!(err.message.contains("503"), "{}", err.message);
        host.reconcile(&Records, Action::Created, &obj).unwrap();

        let denied = FakeHost::new();
        denied.on_http(|r: &HttpRequest| Err(HttpError::Denied(r.url.clone())));
        let err = denied
            .reconcile(&Records, Action::Created, &obj)
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Fatal);
        assert!(err.message.contains("denied"), "{}", err.message);
    }
}
