//! The daemon's configuration, read from TOML. Every setting has a default, so an
//! empty file (or none at all) is the embedded single-node configuration.
//!
//! Durations are written the human way: `"250ms"`, `"5s"`, `"2m"`. Sizes are in
//! MiB. Unknown keys are refused with the key's name, so a typo never silently
//! falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

mod plugin;

pub use crate::controller::ShutdownMode;
pub use crate::plugin::{
    Capabilities, DirGrant, DirRequest, Grants, InstanceMode, Limits, RuntimeConfig,
};
pub use plugin::{BackoffKind, PluginConfig, RetryConfig, resolver};

/// The whole configuration file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Engine-wide settings: compile cache, epoch tick, instance pool.
    pub runtime: RuntimeConfig,
    /// The plugins to run, one controller each.
    #[serde(rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
    /// Manifests (files or directories of `.yaml`/`.yml`/`.json`) applied at start.
    pub manifests: Vec<PathBuf>,
    /// Watch the `manifests` paths: a changed file is applied again, and the
    /// objects of a removed file (or of a document removed from one) are deleted.
    pub watch_manifests: bool,
    /// A folder of plugin components (`*.wasm`), each loaded with default
    /// settings as a controller of its own.
    pub plugin_dir: Option<PathBuf>,
    /// Watch `plugin-dir`: a new component is loaded, a changed one swapped
    /// in, a removed one unloaded.
    pub watch_plugins: bool,
    /// The HTTP admin API.
    pub api: ApiConfig,
    /// The embedded desired-state store.
    pub store: StoreConfig,
    /// What the operator grants plugins whose manifests ask for
    /// capabilities, by plugin name: `[grants.NAME]` with `dirs`, `env` and
    /// `stdio`, as in a `[[plugin]]` table's `grants`.
    pub grants: BTreeMap<String, Grants>,
    /// Whose signatures plugins need before they load (see [`TrustConfig`]).
    /// Absent: no signature is required (the `sha256` pins still hold).
    pub trust: TrustConfig,
}

/// The trust policy: trusted public keys, and which plugins need signatures
/// by which of them (modelled on Kubewarden's verification config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrustConfig {
    /// Trusted keys by name: a public key's text (`setpoint-public-key
    /// ed25519 ...`) or the file holding it (`setpoint plugin keygen` writes
    /// `NAME.pub`).
    pub keys: BTreeMap<String, String>,
    /// Every plugin needs `minimum-matches` valid signatures by `any-of`.
    pub require_signature: bool,
    /// The keys (by name) that count; empty: every trusted key.
    pub any_of: Vec<String>,
    pub minimum_matches: usize,
    /// Rules for some plugins by name, replacing the global one for them.
    pub plugins: BTreeMap<String, crate::trust::Rule>,
}

impl Default for TrustConfig {
    fn default() -> Self {
        Self {
            keys: BTreeMap::new(),
            require_signature: false,
            any_of: Vec::new(),
            minimum_matches: 1,
            plugins: BTreeMap::new(),
        }
    }
}

impl TrustConfig {
    /// The policy, with every key read and parsed; `Err` names the key.
    pub fn policy(&self) -> anyhow::Result<crate::trust::Policy> {
        let mut keys = BTreeMap::new();
        for (name, value) in &self.keys {
            let text = if value.trim_start().starts_with("setpoint-public-key") {
                value.clone()
            } else {
                std::fs::read_to_string(value)
                    .with_context(|| format!("trust.keys.{name}: cannot read key file {value}"))?
            };
            let key = crate::trust::PublicKey::parse(&text)
                .map_err(|e| anyhow::anyhow!("trust.keys.{name}: {e}"))?;
            keys.insert(name.clone(), key);
        }
        Ok(crate::trust::Policy {
            keys,
            rule: crate::trust::Rule {
                require_signature: self.require_signature,
                any_of: self.any_of.clone(),
                minimum_matches: self.minimum_matches,
            },
            plugins: self.plugins.clone(),
        })
    }

    fn check(&self) -> anyhow::Result<()> {
        let rules = std::iter::once(("trust".to_string(), &self.any_of, self.minimum_matches))
            .chain(
                self.plugins
                    .iter()
                    .map(|(n, r)| (format!("trust.plugins.{n}"), &r.any_of, r.minimum_matches)),
            );
        for (at, any_of, minimum) in rules {
            if let Some(unknown) = any_of.iter().find(|k| !self.keys.contains_key(*k)) {
                bail!("{at}.any-of names key {unknown:?}, which is not in trust.keys");
            }
            if minimum == 0 {
                bail!("{at}.minimum-matches must be at least 1");
            }
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            runtime: RuntimeConfig::default(),
            plugins: Vec::new(),
            manifests: Vec::new(),
            watch_manifests: true,
            plugin_dir: None,
            watch_plugins: true,
            api: ApiConfig::default(),
            store: StoreConfig::default(),
            grants: BTreeMap::new(),
            trust: TrustConfig::default(),
        }
    }
}

/// Where the desired state lives.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreConfig {
    /// `redb` (the default: one process, an embedded file) or `etcd`
    /// (replicas sharing the work).
    pub backend: StoreBackend,
    /// The store file (redb). Default: `$XDG_DATA_HOME/setpoint/store.redb`, or
    /// `~/.local/share/setpoint/store.redb`.
    pub path: Option<PathBuf>,
    /// Keep the store in memory only: nothing survives a restart.
    pub in_memory: bool,
    /// With `backend = "etcd"`: the etcd endpoints (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// Every key the replicas write starts with it. Default `/setpoint/`.
    pub prefix: Option<String>,
    /// This replica's name, unique among the replicas sharing `prefix`.
    /// Default: the host name and the API port (the process id with port 0).
    pub replica: Option<String>,
    /// How long a replica that stops renewing keeps what it owned (its
    /// lease), in whole seconds. Default 10s.
    #[serde(with = "humantime_serde")]
    pub ttl: Option<std::time::Duration>,
    /// Shards of the key space; 1 means one leader does all the work.
    /// Default 16.
    pub shards: Option<u32>,
    /// etcd's `--max-txn-ops` (default 128).
    pub max_txn_ops: Option<usize>,
    /// etcd's `--max-request-bytes` (default 1.5 MiB).
    pub max_request_bytes: Option<usize>,
    /// TLS to etcd: `{ ca = "...", cert = "...", key = "..." }`.
    pub tls: Option<EtcdTls>,
    pub user: Option<String>,
    pub password: Option<String>,
}

/// Which store backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreBackend {
    #[default]
    Redb,
    Etcd,
}

/// `[store] tls`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct EtcdTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl StoreConfig {
    /// Refuse settings that cannot work together.
    pub fn check(&self) -> anyhow::Result<()> {
        match self.backend {
            StoreBackend::Redb => {
                let etcd_only = [
                    ("endpoints", !self.endpoints.is_empty()),
                    ("prefix", self.prefix.is_some()),
                    ("replica", self.replica.is_some()),
                    ("ttl", self.ttl.is_some()),
                    ("shards", self.shards.is_some()),
                    ("tls", self.tls.is_some()),
                    ("user", self.user.is_some()),
                ];
                if let Some((name, _)) = etcd_only.iter().find(|(_, set)| *set) {
                    bail!("store.{name} is an etcd setting; add `backend = \"etcd\"` to [store]");
                }
            }
            StoreBackend::Etcd => {
                if self.path.is_some() || self.in_memory {
                    bail!(
                        "store.path and store.in-memory are for the redb backend; with \
                         backend = \"etcd\" the data lives in etcd"
                    );
                }
                if self.endpoints.is_empty() {
                    bail!("store.endpoints: give etcd's address, e.g. [\"http://127.0.0.1:2379\"]");
                }
                if let Some(ttl) = self.ttl
                    && (ttl < std::time::Duration::from_secs(1) || ttl.subsec_nanos() != 0)
                {
                    bail!(
                        "store.ttl must be whole seconds, at least 1s (etcd leases count seconds)"
                    );
                }
                if self.shards == Some(0) {
                    bail!("store.shards must be at least 1 (1: one leader does all the work)");
                }
                if self.user.is_some() != self.password.is_some() {
                    bail!("store.user and store.password go together");
                }
            }
        }
        Ok(())
    }

    /// The etcd settings, for `backend = "etcd"`; `api_port` names the replica
    /// when `replica` is not set.
    pub fn etcd(&self, api_port: u16) -> crate::etcd::Settings {
        let defaults = crate::etcd::Settings::default();
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "setpoint".into());
        let mut prefix = self.prefix.clone().unwrap_or(defaults.prefix);
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        crate::etcd::Settings {
            endpoints: self.endpoints.clone(),
            prefix,
            // Port 0 picks a port at start: the process id tells replicas
            // on one host apart then.
            replica: self.replica.clone().unwrap_or_else(|| match api_port {
                0 => format!("{host}-{}", std::process::id()),
                port => format!("{host}-{port}"),
            }),
            ttl: self.ttl.unwrap_or(defaults.ttl),
            shards: self.shards.unwrap_or(16),
            max_txn_ops: self.max_txn_ops.unwrap_or(defaults.max_txn_ops),
            max_request_bytes: self.max_request_bytes.unwrap_or(defaults.max_request_bytes),
            tls: self.tls.as_ref().map(|t| crate::etcd::Tls {
                ca: t.ca.clone(),
                cert: t.cert.clone(),
                key: t.key.clone(),
            }),
            user: self.user.clone().zip(self.password.clone()),
        }
    }

    /// The store file in effect, or `None` for an in-memory store.
    pub fn path(&self) -> anyhow::Result<Option<PathBuf>> {
        if self.in_memory {
            return Ok(None);
        }
        if let Some(path) = &self.path {
            return Ok(Some(path.clone()));
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .context(
                "neither XDG_DATA_HOME nor HOME is set, so the store has no default place: \
                 set [store] path",
            )?;
        Ok(Some(base.join("setpoint").join("store.redb")))
    }
}

/// The HTTP admin API and `/metrics`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ApiConfig {
    /// Where to listen; port 0 picks a free port (the log says which).
    pub listen: std::net::SocketAddr,
    /// Serve the API at all.
    pub enabled: bool,
    /// A bearer token every request but `/healthz` and `/readyz` must carry
    /// (`Authorization: Bearer <token>`). Required when `listen` is not a
    /// loopback address.
    pub token: Option<String>,
    /// The largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
}

impl ApiConfig {
    /// Refuse an API reachable from other machines without a token.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.token.as_deref() == Some("") {
            bail!("api.token is empty: set a secret, or remove the key");
        }
        if self.enabled && !self.listen.ip().is_loopback() && self.token.is_none() {
            bail!(
                "api.listen is {}, which other machines can reach: set api.token (a bearer \
                 token clients must send) or listen on 127.0.0.1",
                self.listen
            );
        }
        Ok(())
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 7171)),
            enabled: true,
            token: None,
            max_body_bytes: 1024 * 1024,
        }
    }
}

impl Config {
    /// Read and check a configuration file. Relative paths in it are taken
    /// relative to the file's folder.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration file {}", path.display()))?;
        let mut config = Self::parse(&text)
            .with_context(|| format!("configuration file {} is invalid", path.display()))?;
        if let Some(base) = path.parent() {
            config.resolve_relative_to(base);
        }
        Ok(config)
    }

    /// Parse and check configuration text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let config: Config = toml::from_str(text)?;
        config.check()?;
        Ok(config)
    }

    fn resolve_relative_to(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(dir) = &mut self.runtime.cache_dir {
            fix(dir);
        }
        if let Some(dir) = &mut self.runtime.oci_cache_dir {
            fix(dir);
        }
        if let Some(path) = &mut self.store.path {
            fix(path);
        }
        if let Some(tls) = &mut self.store.tls {
            [&mut tls.ca, &mut tls.cert, &mut tls.key]
                .into_iter()
                .flatten()
                .for_each(fix);
        }
        self.manifests.iter_mut().for_each(fix);
        if let Some(dir) = &mut self.plugin_dir {
            fix(dir);
        }
        for plugin in &mut self.plugins {
            if !crate::oci::is_reference(&plugin.path) {
                fix(&mut plugin.path);
            }
            plugin.grants.dirs.iter_mut().for_each(|d| fix(&mut d.host));
        }
        for grants in self.grants.values_mut() {
            grants.dirs.iter_mut().for_each(|d| fix(&mut d.host));
        }
        for key in self.trust.keys.values_mut() {
            if !key.trim_start().starts_with("setpoint-public-key") {
                let mut path = PathBuf::from(&*key);
                fix(&mut path);
                *key = path.display().to_string();
            }
        }
    }

    /// Refuse settings that cannot work, saying which and why.
    pub fn check(&self) -> anyhow::Result<()> {
        self.api.check()?;
        self.store.check()?;
        if self.api.max_body_bytes == 0 {
            bail!("api.max-body-bytes must be at least 1");
        }
        if self.runtime.epoch_tick.is_zero() {
            bail!("runtime.epoch-tick must be more than 0");
        }
        self.trust.check()?;
        for (i, p) in self.plugins.iter().enumerate() {
            p.check(
                &format!("plugin #{} ({})", i + 1, p.path.display()),
                &self.runtime,
            )?;
        }
        for (name, grants) in &self.grants {
            for d in &grants.dirs {
                if !d.guest.starts_with('/') {
                    bail!(
                        "grants.{name}: guest path {:?} must be absolute, e.g. /data",
                        d.guest
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn empty_text_is_the_default_configuration() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn durations_and_grants_parse() {
        let c = Config::parse(
            r#"
            [[plugin]]
            path = "files.wasm"
            instances = "fresh"
            limits = { max-reconcile-time = "250ms", memory-mib = 32 }
            grants.dirs = [{ host = "out", guest = "/data" }]
            "#,
        )
        .unwrap();
        let p = &c.plugins[0];
        assert_eq!(p.instances, InstanceMode::Fresh);
        assert_eq!(p.limits.max_reconcile_time, Duration::from_millis(250));
        assert_eq!(p.limits.memory_mib, 32);
        assert_eq!(p.grants.dirs[0].guest, "/data");
    }

    #[test]
    fn the_readme_configuration_reference_parses_and_means_what_it_says() {
        let readme = include_str!("../../../README.md");
        let section = readme
            .split("## Configuration reference")
            .nth(1)
            .expect("the README has a configuration reference");
        let toml = section
            .split("```toml\n")
            .nth(1)
            .and_then(|t| t.split("```").next())
            .expect("with a toml block");
        let c = Config::parse(toml).unwrap();
        assert!(c.watch_manifests);
        assert!(!c.store.in_memory);
        assert_eq!(c.api.max_body_bytes, 1024 * 1024);
        assert_eq!(c.plugins[0].retry.max_retries, 10);
        assert_eq!(c.grants["files"].dirs[0].guest, "/data");
        assert_eq!(c.grants["files"].env["REGION"], "eu");
    }

    #[test]
    fn an_etcd_store_reads_its_settings_and_refuses_ones_that_do_not_fit() {
        let c = Config::parse(
            "[store]\nbackend = \"etcd\"\nendpoints = [\"http://10.0.0.1:2379\"]\nreplica = \"a\"\n\
             ttl = \"3s\"\nshards = 4\nprefix = \"/x\"\nuser = \"u\"\npassword = \"p\"\n",
        )
        .unwrap();
        let etcd = c.store.etcd(7171);
        assert_eq!(etcd.endpoints, ["http://10.0.0.1:2379"]);
        assert_eq!(
            (etcd.replica.as_str(), etcd.shards, etcd.prefix.as_str()),
            ("a", 4, "/x/")
        );
        assert_eq!(etcd.ttl, Duration::from_secs(3));
        assert_eq!(etcd.user, Some(("u".into(), "p".into())));
        assert_eq!(etcd.max_txn_ops, 128);
        let defaults =
            Config::parse("[store]\nbackend = \"etcd\"\nendpoints = [\"http://e:2379\"]\n")
                .unwrap()
                .store
                .etcd(7171);
        assert_eq!(
            (defaults.shards, defaults.ttl),
            (16, Duration::from_secs(10))
        );
        assert!(defaults.replica.ends_with("-7171"), "{}", defaults.replica);
        for (text, says) in [
            (
                "[store]\nendpoints = [\"http://e\"]\n",
                "add `backend = \"etcd\"`",
            ),
            ("[store]\nbackend = \"etcd\"\n", "store.endpoints"),
            (
                "[store]\nbackend = \"etcd\"\nendpoints = [\"http://e\"]\npath = \"s.redb\"\n",
                "for the redb backend",
            ),
            (
                "[store]\nbackend = \"etcd\"\nendpoints = [\"http://e\"]\nttl = \"1500ms\"\n",
                "whole seconds",
            ),
            (
                "[store]\nbackend = \"etcd\"\nendpoints = [\"http://e\"]\nshards = 0\n",
                "at least 1",
            ),
            (
                "[store]\nbackend = \"etcd\"\nendpoints = [\"http://e\"]\nuser = \"u\"\n",
                "go together",
            ),
            ("[store]\nbackend = \"zookeeper\"\n", "unknown variant"),
        ] {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn the_store_defaults_to_the_data_folder_and_can_stay_in_memory() {
        let c = Config::parse("[store]\nin-memory = true\n").unwrap();
        assert_eq!(c.store.path().unwrap(), None);
        let c = Config::parse("[store]\npath = \"/tmp/x.redb\"\n").unwrap();
        assert_eq!(c.store.path().unwrap(), Some(PathBuf::from("/tmp/x.redb")));
        let c = Config::parse(
            "[[plugin]]\npath = \"a.wasm\"\nresync-interval = \"10m\"\nfull-reconcile-interval = \"1h\"\n",
        )
        .unwrap();
        assert_eq!(c.plugins[0].resync_interval, Some(Duration::from_secs(600)));
        assert_eq!(
            c.plugins[0].full_reconcile_interval,
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn a_plugin_path_may_be_an_oci_reference_kept_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("setpoint.toml");
        let reference = "oci://127.0.0.1:5000/plugins/hello:v1";
        std::fs::write(&file, format!("[[plugin]]\npath = \"{reference}\"\n")).unwrap();
        let c = Config::load(&file).unwrap();
        assert_eq!(c.plugins[0].path, PathBuf::from(reference));
        let err = Config::parse("[[plugin]]\npath = \"oci://host/Bad\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("lower-case"), "{err:#}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::parse("[runtime]\nepoch-tik = \"1ms\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("epoch-tik"), "{err:#}");
    }

    #[test]
    fn an_api_reachable_from_other_machines_needs_a_token() {
        let err = Config::parse("[api]\nlisten = \"0.0.0.0:7171\"\n").unwrap_err();
        assert!(err.to_string().contains("api.token"), "{err}");
        Config::parse("[api]\nlisten = \"0.0.0.0:7171\"\ntoken = \"s3cret\"\n").unwrap();
        Config::parse("[api]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    }

    #[test]
    fn impossible_settings_are_refused_with_the_reason() {
        let err = Config::parse("[[plugin]]\npath = \"a.wasm\"\nworkers = 0\n").unwrap_err();
        assert!(err.to_string().contains("workers"), "{err}");
        let err = Config::parse("[[plugin]]\nworkers = 1\n").unwrap_err();
        assert!(err.to_string().contains("path"), "{err}");
    }
}
