//! The compile cache: a component is compiled once, and its compiled artifact is
//! kept on disk under a key made of the component's sha256 and a hash of the
//! engine's configuration, so a second load (in this process or the next one)
//! deserializes instead of compiling.
//!
//! The one trap: deserializing an artifact runs machine code that was written to
//! disk, so whoever can write the cache directory can run code in the host. The
//! directory must be as trusted as the host binary; it is created with the
//! process's default permissions and nothing else writes to it.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// How a load got its compiled component.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheOutcome {
    /// Deserialized from the cache: no compilation.
    Hit,
    /// Compiled, and written to the cache for next time.
    Miss,
    /// Compiled; caching is turned off.
    Disabled,
}

/// Compiled components on disk, keyed by content and engine configuration.
pub struct CompileCache {
    dir: Option<PathBuf>,
    engine_hash: String,
    compiles: AtomicU64,
}

/// A [`Hasher`] that feeds a sha256, so the engine's configuration hash is stable
/// across processes (std's default hasher is not guaranteed to be).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        unreachable!("only the digest is read")
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// The hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl CompileCache {
    /// A cache in `dir`, or no cache at all with `None`.
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> Self {
        let mut hasher = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        let engine_hash = hex::encode(&hasher.0.finalize()[..8]);
        Self {
            dir,
            engine_hash,
            compiles: AtomicU64::new(0),
        }
    }

    /// The directory in use, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// How many components this cache compiled (as opposed to deserialized).
    pub fn compiles(&self) -> u64 {
        self.compiles.load(Ordering::Relaxed)
    }

    fn entry(&self, sha256: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        Some(dir.join(format!("{sha256}-{}.cwasm", self.engine_hash)))
    }

    /// The compiled form of `bytes`, whose sha256 is `sha256`: from the cache if
    /// present and loadable, else compiled and stored.
    pub fn get_or_compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
        sha256: &str,
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let Some(entry) = self.entry(sha256) else {
            return Ok((self.compile(engine, bytes)?, CacheOutcome::Disabled));
        };
        if entry.exists() {
            // SAFETY: `deserialize_file` trusts the file to be an artifact that
            // `Component::serialize` produced for a compatible engine. The file
            // name carries the engine's compatibility hash, the file is written
            // only by `store` below (atomically, via rename), and wasmtime itself
            // checks the header and engine compatibility before using it. See the
            // module doc for the trust the cache directory needs.
            match unsafe { Component::deserialize_file(engine, &entry) } {
                Ok(component) => return Ok((component, CacheOutcome::Hit)),
                Err(e) => tracing::warn!(
                    path = %entry.display(),
                    "cached component is unusable, recompiling: {e}"
                ),
            }
        }
        let component = self.compile(engine, bytes)?;
        if let Err(e) = store(&entry, &component) {
            tracing::warn!(path = %entry.display(), "cannot write compile cache: {e:#}");
        }
        Ok((component, CacheOutcome::Miss))
    }

    fn compile(&self, engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Component> {
        let component = Component::new(engine, bytes)?;
        self.compiles.fetch_add(1, Ordering::Relaxed);
        Ok(component)
    }
}

/// Write an artifact atomically: to a temporary file, then renamed into place, so a
/// reader never sees half a file.
fn store(entry: &Path, component: &Component) -> anyhow::Result<()> {
    let dir = entry.parent().expect("cache entries live in a directory");
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, &component.serialize()?)?;
    tmp.as_file().sync_all()?;
    tmp.persist(entry)?;
    Ok(())
}
