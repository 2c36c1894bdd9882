//! `GET /v1/watch`: the store's feed as server-sent events.
//!
//! Each event's `event:` field is its type (`applied`, `status`, `removed`) and
//! its `data:` the JSON of [`WatchEvent`]. A client that falls too far behind
//! gets one `lagged` event saying how many it missed, and should list again.
//! The stream ends when the server shuts down, so it never holds up a graceful
//! shutdown.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::{AppState, Query, QueryParams};
use crate::store::WatchEvent;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    kind: Option<String>,
}

impl QueryParams for WatchQuery {
    const NAMES: &'static [&'static str] = &["kind"];
}

pub async fn watch(
    State(state): State<AppState>,
    Query(q): Query<WatchQuery>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let feed = state.store.feed();
    let stopping = state.stopping.clone();
    let stream = futures::stream::unfold((feed, q.kind), move |(mut feed, kind)| {
        let stopping = stopping.clone();
        async move {
            loop {
                let received = tokio::select! {
                    r = feed.recv() => r,
                    _ = stopping.cancelled() => return None,
                };
                let event = match received {
                    Ok(e) if kind.as_deref().is_none_or(|k| e.kind() == k) => to_sse(&e),
                    Ok(_) => continue,
                    Err(RecvError::Lagged(n)) => Event::default()
                        .event("lagged")
                        .data(format!("{{\"missed\":{n}}}")),
                    Err(RecvError::Closed) => return None,
                };
                return Some((Ok(event), (feed, kind)));
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn to_sse(event: &WatchEvent) -> Event {
    let name = match event {
        WatchEvent::Applied { .. } => "applied",
        WatchEvent::Status { .. } => "status",
        WatchEvent::Removed { .. } => "removed",
    };
    let data = serde_json::to_string(event).expect("events serialize");
    Event::default().event(name).data(data)
}
