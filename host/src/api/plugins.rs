//! `/v1/plugins`: the plugin registry over HTTP: list, load, swap, roll back,
//! unload, one plugin with its history.
//!
//! Every refusal is a JSON `{"error"}`: 404 for a plugin that is not loaded,
//! 409 for one that already is, 422 for a version that did not load (with the
//! loader's message, which says what was wrong) or a swap the controller
//! refuses. Nothing changes on a refusal.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::{ApiError, AppState, Path, read_body, respond};
use crate::config::{Grants, PluginConfig, RuntimeConfig};
use crate::object::quote;
use crate::registry::{Registry, RegistryError};

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match e {
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::Exists(_) => StatusCode::CONFLICT,
            RegistryError::NoSuchVersion { .. } => StatusCode::NOT_FOUND,
            RegistryError::Load(_) | RegistryError::Manager(_) => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, e.to_string())
    }
}

fn registry(state: &AppState) -> Result<&Registry, ApiError> {
    state.registry.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server runs no plugin registry",
        )
    })
}

/// The body of a load or swap: the component's path, and for a load the
/// plugin's settings as in a `[[plugin]]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SwapBody {
    path: std::path::PathBuf,
}

/// The body of a rollback: the version (or a sha256 prefix) to go back to;
/// without it, the newest kept version before the active one.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    #[serde(default)]
    to: Option<String>,
}

async fn json_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    body: Body,
    what: &str,
) -> Result<T, ApiError> {
    let bytes = read_body(body, state.max_body).await?;
    let text = if bytes.iter().all(u8::is_ascii_whitespace) {
        "{}"
    } else {
        std::str::from_utf8(&bytes).map_err(|_| ApiError::bad_request("the body is not UTF-8"))?
    };
    serde_json::from_str(text).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not a {what}: {e}; send JSON, e.g. {{\"path\": \"plugins/hello.wasm\"}}"
        ))
    })
}

/// `GET /v1/plugins`: every plugin, running, failed or unloaded.
pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    Ok(respond(&headers, StatusCode::OK, &registry(&state)?.list()))
}

/// `GET /v1/plugins/{name}`: one plugin with its history.
pub async fn get(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let view = registry(&state)?
        .view(&name)
        .ok_or_else(|| RegistryError::NotFound(quote(&name).to_string()))?;
    Ok(respond(&headers, StatusCode::OK, &view))
}

/// `POST /v1/plugins`: load a new plugin. `{"path": ...}` alone loads it
/// with its manifest (`NAME.toml` beside it, or the daemon's `[[plugin]]`
/// table for the file), or default settings; a whole plugin table as JSON
/// (`path`, `name`, `workers`, `limits`, `capabilities` ...) is its manifest.
/// Such a table may not carry `grants`: those come from the daemon's
/// configuration, `[grants.NAME]`.
pub async fn load(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let table: PluginConfig = json_body(&state, body, "plugin table").await?;
    let registry = registry(&state)?;
    if table.grants != Grants::default() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "a load cannot grant capabilities: ask in `capabilities`; the operator grants \
             them in the daemon's configuration under [grants.NAME]",
        ));
    }
    let path_only = PluginConfig {
        path: table.path.clone(),
        ..PluginConfig::default()
    };
    let view = if table == path_only {
        registry.load_path(&table.path).await?
    } else {
        table
            .check("the plugin table", &RuntimeConfig::default())
            .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}")))?;
        registry.load(table.manifest_spec()).await?
    };
    Ok(respond(&headers, StatusCode::CREATED, &view))
}

/// `POST /v1/plugins/{name}/swap` `{"path": ...}`: a new version of a running
/// plugin, with its manifest if it has one, else the running version's
/// settings.
pub async fn swap(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let SwapBody { path } = json_body(&state, body, "swap").await?;
    let registry = registry(&state)?;
    if state.manager.controller(&name).is_none() {
        return Err(RegistryError::NotFound(quote(&name).to_string()).into());
    }
    let view = registry.swap_path(&name, &path).await?;
    Ok(respond(&headers, StatusCode::OK, &view))
}

/// `POST /v1/plugins/{name}/rollback` `{"to": VERSION}` (optional).
pub async fn rollback(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let RollbackBody { to } = json_body(&state, body, "rollback").await?;
    let view = registry(&state)?.rollback(&name, to.as_deref())?;
    Ok(respond(&headers, StatusCode::OK, &view))
}

/// `DELETE /v1/plugins/{name}`: unload after the work in flight.
pub async fn unload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let view = registry(&state)?.unload(&name).await?;
    Ok(respond(&headers, StatusCode::OK, &view))
}
