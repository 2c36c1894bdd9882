//! `setpoint plugin push | pull`: components to and from OCI registries (see
//! [`crate::oci`] for the artifact and what a pull checks).
//!
//! Guarantee: `pull --out FILE` writes FILE (and FILE.sig, or removes a stale
//! one) only from a pull that passed every check.

use std::path::Path;

use anyhow::Context;

use crate::config::RuntimeConfig;
use crate::oci::{Cache, OciRef};
use crate::trust::signature_path;

/// Push `file` to `reference`; print the digest and the pinned reference.
pub async fn push(file: &Path, reference: &str) -> anyhow::Result<()> {
    let to = OciRef::parse(reference).map_err(anyhow::Error::msg)?;
    let pushed = crate::oci::push(file, &to)
        .await
        .map_err(anyhow::Error::msg)?;
    println!(
        "pushed {} to {to} ({})\ndigest: {}\npinned: {}",
        file.display(),
        if pushed.signed {
            "with its signatures"
        } else {
            "unsigned"
        },
        pushed.digest,
        pushed.pinned
    );
    Ok(())
}

/// Pull `reference` into the cache (and copy it to `out`); print where it is.
pub async fn pull(reference: &str, out: Option<&Path>) -> anyhow::Result<()> {
    let from = OciRef::parse(reference).map_err(anyhow::Error::msg)?;
    let cache = Cache::new(RuntimeConfig::default().oci_cache_dir());
    let pulled = cache.pull(&from).await.map_err(anyhow::Error::msg)?;
    let mut file = pulled.path.clone();
    if let Some(out) = out {
        std::fs::copy(&pulled.path, out)
            .with_context(|| format!("cannot write {}", out.display()))?;
        let sig = signature_path(out);
        if pulled.signed {
            std::fs::copy(signature_path(&pulled.path), &sig)
                .with_context(|| format!("cannot write {}", sig.display()))?;
        } else if sig.exists() {
            std::fs::remove_file(&sig)
                .with_context(|| format!("cannot remove the stale {}", sig.display()))?;
        }
        file = out.to_path_buf();
    }
    println!(
        "pulled {from} ({}, {})\ndigest: {}\npinned: {}\nfile: {}",
        if pulled.cached {
            "from the cache"
        } else {
            "downloaded"
        },
        if pulled.signed { "signed" } else { "unsigned" },
        pulled.digest,
        pulled.pinned,
        file.display()
    );
    Ok(())
}
