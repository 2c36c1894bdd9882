//! Plugins in OCI registries: `oci://HOST[:PORT]/REPO[:TAG][@sha256:DIGEST]`
//! references, push, pull, and a local cache of pulled components by digest.
//!
//! The artifact is the CNCF Wasm OCI layout (`oci-wasm`'s media types): an OCI
//! image manifest whose config is `application/vnd.wasm.config.v0+json` and
//! whose one layer is the component, `application/wasm`, so `wkg` and other
//! tools pull what Setpoint pushes and the other way round. The component's
//! signatures (the exact text of its `FILE.sig`, see [`crate::trust`]) travel
//! as the manifest annotation [`SIGNATURE_ANNOTATION`]: a second layer would
//! make `oci-wasm`'s and `wkg`'s pulls refuse the artifact (they take exactly
//! one layer, of type `application/wasm`). The manifest digest covers the
//! annotation, so a digest-pinned reference pins the signatures too.
//!
//! Registries on loopback (`127.0.0.1`, `localhost`, `[::1]`) and the hosts in
//! `SETPOINT_REGISTRY_PLAIN_HTTP` (comma-separated `HOST:PORT`) are spoken to
//! over plain HTTP, every other one over HTTPS. Access is anonymous, or basic
//! auth with `SETPOINT_REGISTRY_USERNAME` and `SETPOINT_REGISTRY_PASSWORD`.
//! A registry that accepts no connection in 10 s, or sends nothing for 60 s,
//! fails the push or pull.
//!
//! Guarantees:
//! - A pulled component's bytes hash to the layer digest its manifest names,
//!   and the manifest's bytes to the manifest digest; a reference's
//!   `@sha256:` pin must be that digest. Any mismatch is refused, naming both
//!   digests.
//! - The cache (`DIR/sha256/<manifest hex>.wasm`, its `.wasm.sig` and the
//!   manifest `.json`) is written atomically (temporary file and rename, the
//!   manifest last), and a cached entry is used only if it still checks out
//!   against its manifest; otherwise it is pulled again. A reference with a
//!   digest and no tag that is cached needs no network.
//! - A reference with both a tag and a digest is resolved by the tag, online,
//!   and refused unless the tag names that digest.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol, ImageLayer};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_wasm::{WASM_LAYER_MEDIA_TYPE, WASM_MANIFEST_CONFIG_MEDIA_TYPE, WasmConfig};

use crate::plugin::sha256_hex;
use crate::trust::signature_path;

/// How references start.
pub const SCHEME: &str = "oci://";

/// The manifest annotation that holds the component's signatures: the exact
/// text of its `FILE.sig`.
pub const SIGNATURE_ANNOTATION: &str = "dev.setpoint.signature.v1";

/// The variables that give basic-auth credentials for every registry.
pub const USERNAME_VAR: &str = "SETPOINT_REGISTRY_USERNAME";
pub const PASSWORD_VAR: &str = "SETPOINT_REGISTRY_PASSWORD";
/// Extra `HOST:PORT`s (comma-separated) spoken to over plain HTTP.
pub const PLAIN_HTTP_VAR: &str = "SETPOINT_REGISTRY_PLAIN_HTTP";

/// Whether a plugin path is an `oci://` reference rather than a file.
pub fn is_reference(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.starts_with(SCHEME))
}

/// An `oci://HOST[:PORT]/REPO[:TAG][@sha256:DIGEST]` reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OciRef {
    /// `HOST[:PORT]`.
    pub host: String,
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex digits>`.
    pub digest: Option<String>,
}

impl OciRef {
    /// Parse a reference, saying what is wrong with one that is not.
    pub fn parse(text: &str) -> Result<Self, String> {
        let shape = "the form is oci://HOST[:PORT]/REPO[:TAG][@sha256:DIGEST], e.g. \
                     oci://127.0.0.1:5000/plugins/hello:1.0.0";
        let bad = |why: &str| Err(format!("{text:?} is not an OCI reference: {why}; {shape}"));
        let Some(rest) = text.strip_prefix(SCHEME) else {
            return bad("it does not start with oci://");
        };
        let Some((host, rest)) = rest.split_once('/') else {
            return bad("it names no repository after the host");
        };
        let host_ok = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if host.is_empty() || !host_ok {
            return bad("the host is missing or has characters a host cannot have");
        }
        let (rest, digest) = match rest.split_once('@') {
            Some((rest, digest)) => (rest, Some(digest)),
            None => (rest, None),
        };
        if let Some(d) = digest {
            let hex = d.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return bad("the digest must be sha256: and 64 lower-case hex digits");
            }
        }
        // A tag follows the last ':' after the last '/'.
        let (repository, tag) = match rest.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
            _ => (rest, None),
        };
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|part| {
                let b = part.as_bytes();
                !b.is_empty()
                    && b[0].is_ascii_alphanumeric()
                    && b[b.len() - 1].is_ascii_alphanumeric()
                    && part
                        .bytes()
                        .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
            });
        if !repo_ok {
            return bad(
                "the repository must be lower-case letters, digits and . _ - in parts \
                 separated by /",
            );
        }
        if let Some(t) = tag {
            let ok = t.len() <= 128
                && t.bytes().enumerate().all(|(i, c)| {
                    c.is_ascii_alphanumeric() || c == b'_' || (i > 0 && (c == b'.' || c == b'-'))
                });
            if !ok {
                return bad("the tag must be up to 128 letters, digits, _ . - (not first)");
            }
        }
        Ok(Self {
            host: host.to_string(),
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest: digest.map(str::to_string),
        })
    }

    /// The same repository pinned to `digest`, without a tag.
    pub fn pinned(&self, digest: &str) -> Self {
        Self {
            tag: None,
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }

    /// The last part of the repository: what a plugin goes by before its
    /// `describe()`.
    pub fn name(&self) -> &str {
        self.repository
            .rsplit('/')
            .next()
            .unwrap_or(&self.repository)
    }

    fn by_tag(&self) -> Reference {
        let tag = self.tag.clone().unwrap_or_else(|| "latest".into());
        Reference::with_tag(self.host.clone(), self.repository.clone(), tag)
    }

    /// What to ask the registry for: the digest if there is one and no tag to
    /// check, else the tag.
    fn to_fetch(&self) -> Reference {
        match (&self.tag, &self.digest) {
            (None, Some(digest)) => {
                Reference::with_digest(self.host.clone(), self.repository.clone(), digest.clone())
            }
            _ => self.by_tag(),
        }
    }

    fn plain_http(&self) -> bool {
        let name = match self.host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => self.host.as_str(),
        };
        let loopback = matches!(name, "localhost" | "[::1]")
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let listed = std::env::var(PLAIN_HTTP_VAR)
            .is_ok_and(|v| v.split(',').any(|h| h.trim() == self.host));
        loopback || listed
    }

    fn client(&self) -> Client {
        let protocol = if self.plain_http() {
            ClientProtocol::HttpsExcept(vec![self.host.clone()])
        } else {
            ClientProtocol::Https
        };
        Client::new(ClientConfig {
            protocol,
            // A registry that does not answer fails the load instead of
            // holding it forever.
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..ClientConfig::default()
        })
    }
}

impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.host, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn auth() -> RegistryAuth {
    match (std::env::var(USERNAME_VAR), std::env::var(PASSWORD_VAR)) {
        (Ok(user), Ok(password)) => RegistryAuth::Basic(user, password),
        _ => RegistryAuth::Anonymous,
    }
}

/// `sha256:<hex>` of `bytes`.
fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// `Err` unless `bytes` hash to `digest`; `what` names them.
pub fn check_digest(what: &str, bytes: &[u8], digest: &str) -> Result<(), String> {
    let actual = digest_of(bytes);
    if actual == digest {
        return Ok(());
    }
    Err(format!(
        "{what} has digest {actual}, but the manifest names {digest}: the registry served \
         other bytes than it lists; refusing them"
    ))
}

/// An error with its causes: `a: b: c`.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// A registry's error, said plainly with what to do.
fn explain(e: OciDistributionError, what: &str, reference: &OciRef) -> String {
    let host = &reference.host;
    let scheme = if reference.plain_http() {
        "plain HTTP"
    } else {
        "HTTPS"
    };
    let not_found = |e: &OciDistributionError| match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound
                    | OciErrorCode::BlobUnknown
            )
        }),
        _ => false,
    };
    let causes = with_causes(&e);
    match &e {
        OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout() => format!(
            "cannot {what} {reference}: the registry at {host} cannot be reached over {scheme} \
             ({causes}). Is it running, and is the address right? (loopback registries and those \
             in {PLAIN_HTTP_VAR} are spoken to over plain HTTP)"
        ),
        _ if not_found(&e) => format!(
            "cannot {what} {reference}: the registry at {host} has no such repository, tag or \
             digest ({causes}). Check the reference, or push it first: setpoint plugin push FILE \
             {reference}"
        ),
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => format!(
            "cannot {what} {reference}: the registry at {host} refused access ({causes}). Set \
             {USERNAME_VAR} and {PASSWORD_VAR} to credentials it accepts"
        ),
        _ => format!("cannot {what} {reference}: {causes}"),
    }
}

/// What a push did.
#[derive(Clone, Debug)]
pub struct Pushed {
    /// The manifest's digest.
    pub digest: String,
    /// The reference pinned to it: `oci://HOST/REPO@sha256:...`.
    pub pinned: OciRef,
    /// Whether `FILE.sig` went with it.
    pub signed: bool,
}

/// Push the component `file` (with `FILE.sig` if there is one) to `to`.
pub async fn push(file: &Path, to: &OciRef) -> Result<Pushed, String> {
    if to.digest.is_some() {
        return Err(format!(
            "{to}: push to a tag (oci://HOST/REPO:TAG), not a digest; the push prints the \
             digest the registry stores it under"
        ));
    }
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let signatures = std::fs::read_to_string(signature_path(file)).ok();
    let (config, layer) = WasmConfig::from_raw_component(bytes, None).map_err(|e| {
        format!(
            "{} is not a WebAssembly component ({e}); push a component (`setpoint plugin \
             inspect FILE` checks it)",
            file.display()
        )
    })?;
    let config = oci_wasm::ToConfig::to_config(&config).map_err(|e| format!("{e:#}"))?;
    let annotations = signatures
        .as_ref()
        .map(|s| BTreeMap::from([(SIGNATURE_ANNOTATION.to_string(), s.clone())]));
    let mut manifest = OciImageManifest::build(std::slice::from_ref(&layer), &config, annotations);
    manifest.media_type = Some(OCI_IMAGE_MEDIA_TYPE.to_string());
    // The digest is that of exactly these bytes, as sent.
    let body = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
    let digest = digest_of(&body);
    let client = to.client();
    let image = to.by_tag();
    let fail = |e| explain(e, "push to", to);
    client.store_auth_if_needed(&to.host, &auth()).await;
    let ImageLayer { data, .. } = layer;
    client
        .push_blob(&image, data, &manifest.layers[0].digest)
        .await
        .map_err(fail)?;
    client
        .push_blob(&image, config.data, &manifest.config.digest)
        .await
        .map_err(fail)?;
    client
        .push_manifest_raw(
            &image,
            body,
            axum::http::HeaderValue::from_static(OCI_IMAGE_MEDIA_TYPE),
        )
        .await
        .map_err(fail)?;
    Ok(Pushed {
        pinned: to.pinned(&digest),
        digest,
        signed: signatures.is_some(),
    })
}

/// A component pulled into the cache (or found there).
#[derive(Clone, Debug)]
pub struct Pulled {
    /// The cached component; its signatures, if any, are beside it in
    /// [`signature_path`].
    pub path: PathBuf,
    /// The manifest's digest.
    pub digest: String,
    /// The reference pinned to it.
    pub pinned: OciRef,
    pub signed: bool,
    /// Found in the cache: the component's bytes were not downloaded.
    pub cached: bool,
}

/// Components pulled from registries, by manifest digest, in one folder.
#[derive(Clone, Debug)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn file(&self, digest: &str, extension: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.join("sha256").join(format!("{hex}.{extension}"))
    }

    /// Pull `reference` into the cache, or find it there, and return the
    /// cached file: see the module doc for what is checked.
    pub async fn pull(&self, reference: &OciRef) -> Result<Pulled, String> {
        if let (None, Some(digest)) = (&reference.tag, &reference.digest)
            && let Some(hit) = self.cached(reference, digest)?
        {
            return Ok(hit);
        }
        let client = reference.client();
        let fail = |e| explain(e, "pull", reference);
        let image = reference.to_fetch();
        let (raw, digest) = client
            .pull_manifest_raw(&image, &auth(), &[OCI_IMAGE_MEDIA_TYPE])
            .await
            .map_err(fail)?;
        check_digest(&format!("the manifest of {reference}"), &raw, &digest)?;
        if let Some(pin) = &reference.digest
            && *pin != digest
        {
            return Err(format!(
                "{reference} is pinned to {pin}, but the registry's manifest for it has digest \
                 {digest}: the tag moved, or the pin is wrong. Pin the digest you mean, or drop \
                 the pin to take what the tag names"
            ));
        }
        if let Some(hit) = self.cached(reference, &digest)? {
            return Ok(hit);
        }
        let manifest = parse_manifest(reference, &raw)?;
        let layer = wasm_layer(reference, &manifest)?;
        let mut bytes = Vec::new();
        client
            .pull_blob(&image, layer, &mut bytes)
            .await
            .map_err(fail)?;
        check_digest(
            &format!("the component of {reference}"),
            &bytes,
            &layer.digest,
        )?;
        let path = self.file(&digest, "wasm");
        write_atomically(&path, &bytes)?;
        let signed = self.place_signatures(&path, &manifest)?;
        // Last: an entry is complete once its manifest is there.
        write_atomically(&self.file(&digest, "json"), &raw)?;
        Ok(Pulled {
            path,
            pinned: reference.pinned(&digest),
            digest,
            signed,
            cached: false,
        })
    }

    /// The cached entry for `digest`, if it is complete and checks out.
    fn cached(&self, reference: &OciRef, digest: &str) -> Result<Option<Pulled>, String> {
        let Ok(raw) = std::fs::read(self.file(digest, "json")) else {
            return Ok(None);
        };
        let path = self.file(digest, "wasm");
        let checks = || -> Result<OciImageManifest, String> {
            check_digest("the cached manifest", &raw, digest)?;
            let manifest = parse_manifest(reference, &raw)?;
            let layer = wasm_layer(reference, &manifest)?;
            let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
            check_digest("the cached component", &bytes, &layer.digest)?;
            Ok(manifest)
        };
        match checks() {
            Ok(manifest) => {
                let signed = self.place_signatures(&path, &manifest)?;
                Ok(Some(Pulled {
                    path,
                    digest: digest.to_string(),
                    pinned: reference.pinned(digest),
                    signed,
                    cached: true,
                }))
            }
            Err(why) => {
                tracing::warn!(%reference, "the cached copy is damaged ({why}); pulling it again");
                Ok(None)
            }
        }
    }

    /// Write the manifest's signatures beside `component` (or remove a stale
    /// file if it has none); whether it has some.
    fn place_signatures(
        &self,
        component: &Path,
        manifest: &OciImageManifest,
    ) -> Result<bool, String> {
        let sig = signature_path(component);
        let text = manifest
            .annotations
            .as_ref()
            .and_then(|a| a.get(SIGNATURE_ANNOTATION));
        match text {
            Some(text) => {
                if std::fs::read_to_string(&sig).ok().as_ref() != Some(text) {
                    write_atomically(&sig, text.as_bytes())?;
                }
                Ok(true)
            }
            None => {
                match std::fs::remove_file(&sig) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("cannot remove {}: {e}", sig.display())),
                }
                Ok(false)
            }
        }
    }
}

fn parse_manifest(reference: &OciRef, raw: &[u8]) -> Result<OciImageManifest, String> {
    let manifest: OciImageManifest = serde_json::from_slice(raw)
        .map_err(|e| format!("the manifest of {reference} is not an OCI image manifest: {e}"))?;
    if manifest.config.media_type != WASM_MANIFEST_CONFIG_MEDIA_TYPE {
        return Err(format!(
            "{reference} is not a Wasm component artifact: its config is {:?}, not \
             {WASM_MANIFEST_CONFIG_MEDIA_TYPE:?} (push components with `setpoint plugin push` \
             or `wkg oci push`)",
            manifest.config.media_type
        ));
    }
    Ok(manifest)
}

fn wasm_layer<'a>(
    reference: &OciRef,
    manifest: &'a OciImageManifest,
) -> Result<&'a oci_client::manifest::OciDescriptor, String> {
    let mut wasm = manifest
        .layers
        .iter()
        .filter(|l| l.media_type == WASM_LAYER_MEDIA_TYPE);
    match (wasm.next(), wasm.next()) {
        (Some(layer), None) => Ok(layer),
        _ => Err(format!(
            "{reference} must have exactly one {WASM_LAYER_MEDIA_TYPE:?} layer, and has {}",
            manifest
                .layers
                .iter()
                .filter(|l| l.media_type == WASM_LAYER_MEDIA_TYPE)
                .count()
        )),
    }
}

/// Write `bytes` to `path` through a temporary file in the same folder and a
/// rename: readers see the old file or the whole new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    std::fs::create_dir_all(dir).map_err(fail)?;
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(fail)?;
    std::io::Write::write_all(&mut file, bytes).map_err(fail)?;
    file.persist(path).map_err(|e| fail(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_parse_and_print_back() {
        for text in [
            "oci://127.0.0.1:5000/plugins/hello:1.0.0",
            "oci://localhost/hello",
            "oci://ghcr.io/org/team/hello:v2",
            &format!("oci://127.0.0.1:5000/plugins/hello@{DIGEST}"),
            &format!("oci://127.0.0.1:5000/plugins/hello:v1@{DIGEST}"),
        ] {
            let r = OciRef::parse(text).unwrap();
            assert_eq!(r.to_string(), text);
        }
        let r = OciRef::parse("oci://127.0.0.1:5000/plugins/hello:v1").unwrap();
        assert_eq!(r.host, "127.0.0.1:5000");
        assert_eq!(r.repository, "plugins/hello");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.name(), "hello");
        assert!(r.plain_http());
        assert_eq!(
            r.pinned(DIGEST).to_string(),
            format!("oci://127.0.0.1:5000/plugins/hello@{DIGEST}")
        );
        assert!(!OciRef::parse("oci://ghcr.io/a/b").unwrap().plain_http());
        assert!(OciRef::parse("oci://[::1]:5000/a").unwrap().plain_http());
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for (text, why) in [
            ("http://host/repo", "oci://"),
            ("oci://host", "no repository"),
            ("oci://host/Hello", "lower-case"),
            ("oci://host/repo@sha256:abc", "64 lower-case hex"),
            ("oci://host/repo:-x", "tag"),
            ("oci:///repo", "host"),
        ] {
            let err = OciRef::parse(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
            assert!(err.contains("oci://HOST[:PORT]/REPO"), "{err}");
        }
    }

    #[test]
    fn a_digest_mismatch_names_both() {
        let err = check_digest("the component", b"other", DIGEST).unwrap_err();
        assert!(err.contains(DIGEST), "{err}");
        assert!(err.contains(&digest_of(b"other")), "{err}");
        check_digest("the component", b"same", &digest_of(b"same")).unwrap();
    }
}
