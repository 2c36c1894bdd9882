//! `setpoint plugin keygen | sign | verify`: publishers sign components
//! without other tools (see [`crate::trust`] for what is signed and how).
//!
//! Guarantees: a secret key file is created with mode 0600 and never
//! overwritten; signing replaces only the signing key's own line in
//! `FILE.sig`, so co-signers' lines stay.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::config::{PluginConfig, RuntimeConfig};
use crate::trust::{Policy, PublicKey, Rule, SecretKey, Signed, signature_path};

/// What a signature over `file` covers: its sha256, and the name and
/// version of its manifest (`NAME.toml` beside it), unless given.
pub fn signed(
    file: &Path,
    name: Option<String>,
    version: Option<String>,
) -> anyhow::Result<Signed> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let manifest_file = file.with_extension("toml");
    let manifest = if manifest_file.is_file() {
        Some(PluginConfig::read_manifest(
            &manifest_file,
            &RuntimeConfig::default(),
        )?)
    } else {
        None
    };
    Ok(Signed {
        sha256: crate::plugin::sha256_hex(&bytes),
        name: name
            .or_else(|| manifest.as_ref().and_then(|m| m.name.clone()))
            .unwrap_or_default(),
        version: version
            .or_else(|| manifest.as_ref().and_then(|m| m.version.clone()))
            .unwrap_or_default(),
    })
}

/// Write a new key pair: `PREFIX.key` (secret) and `PREFIX.pub`.
pub fn keygen(prefix: &Path) -> anyhow::Result<()> {
    let secret_path = with_suffix(prefix, ".key");
    let public_path = with_suffix(prefix, ".pub");
    for p in [&secret_path, &public_path] {
        if p.exists() {
            bail!("{} exists: choose another --out, or remove it", p.display());
        }
    }
    let key = SecretKey::generate().map_err(anyhow::Error::msg)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&secret_path)
        .with_context(|| format!("cannot create {}", secret_path.display()))?;
    std::io::Write::write_all(&mut file, format!("{}\n", key.to_text()).as_bytes())?;
    std::fs::write(&public_path, format!("{}\n", key.public().to_text()))?;
    println!(
        "secret key: {} (keep it secret)\npublic key: {} (id {}): add it to the daemon's [trust] keys",
        secret_path.display(),
        public_path.display(),
        key.public().id()
    );
    Ok(())
}

/// Sign `file` with the secret key in `key_file` into `FILE.sig`.
pub fn sign(
    file: &Path,
    key_file: &Path,
    name: Option<String>,
    version: Option<String>,
) -> anyhow::Result<()> {
    let key = SecretKey::parse(&read(key_file)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key_file.display()))?;
    let signed = signed(file, name, version)?;
    let line = key.sign(&signed);
    let sig_path = signature_path(file);
    let id = key.public().id();
    let mut lines: Vec<String> = std::fs::read_to_string(&sig_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().nth(2) != Some(id.as_str()))
        .map(str::to_string)
        .collect();
    lines.push(line);
    std::fs::write(&sig_path, lines.join("\n") + "\n")
        .with_context(|| format!("cannot write {}", sig_path.display()))?;
    println!(
        "signed {} (sha256 {}, name {:?}, version {:?}) with key {id} into {}",
        file.display(),
        &signed.sha256[..12],
        signed.name,
        signed.version,
        sig_path.display()
    );
    Ok(())
}

/// Check `file`'s signatures against the public keys in `keys`: succeeds if
/// at least one of them signed it, and says which.
pub fn verify(
    file: &Path,
    keys: &[PathBuf],
    name: Option<String>,
    version: Option<String>,
) -> anyhow::Result<()> {
    let signed = signed(file, name, version)?;
    let sig_path = signature_path(file);
    let signatures = std::fs::read_to_string(&sig_path).ok();
    let mut policy = Policy {
        rule: Rule {
            require_signature: true,
            ..Rule::default()
        },
        ..Policy::default()
    };
    for path in keys {
        let key = PublicKey::parse(&read(path)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        policy.keys.insert(path.display().to_string(), key);
    }
    let plugin = file.display().to_string();
    policy
        .check(&plugin, &signed, signatures.as_deref())
        .map_err(anyhow::Error::msg)?;
    let by: Vec<String> = policy
        .keys
        .iter()
        .filter(|(_, key)| {
            let one = Policy {
                keys: [(String::new(), (*key).clone())].into(),
                ..policy.clone()
            };
            one.check(&plugin, &signed, signatures.as_deref()).is_ok()
        })
        .map(|(name, key)| format!("{name} ({})", key.id()))
        .collect();
    println!(
        "{}: signature verified, by {}",
        file.display(),
        by.join(", ")
    );
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}
