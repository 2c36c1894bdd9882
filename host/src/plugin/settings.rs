//! What the plugin runtime is told about the engine and about each plugin:
//! [`RuntimeConfig`] for the engine shared by every plugin, [`Settings`] for
//! one plugin's instances (how they are made, their limits, what they are
//! granted), and [`Capabilities`], what a plugin's manifest asks for.
//!
//! These are the runtime's own types; the configuration file embeds them as
//! TOML tables. Guarantee: a plugin gets exactly the capabilities in its
//! [`Settings::grants`], nothing else; [`Capabilities::granted_by`] turns a
//! request into grants only if the operator granted every part of it, and
//! otherwise names the first part that was not.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::http::HostPattern;

/// One plugin's runtime settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// The name the plugin runs under: its controller's, and its key-value
    /// store's. `None`: what its `describe()` says.
    pub name: Option<String>,
    /// Warm (reused) or fresh (per call) instances.
    pub instances: InstanceMode,
    /// A warm instance is replaced after this many calls.
    pub recycle_after: u64,
    /// Per-call and per-instance limits.
    pub limits: Limits,
    /// Capabilities beyond the host API.
    pub grants: Grants,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            name: None,
            instances: InstanceMode::Warm,
            recycle_after: 10_000,
            limits: Limits::default(),
            grants: Grants::default(),
        }
    }
}

/// Settings shared by every plugin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RuntimeConfig {
    /// Where compiled components are cached. Default: `$XDG_CACHE_HOME/setpoint`
    /// or `~/.cache/setpoint`. Set `cache = false` to compile on every load.
    pub cache_dir: Option<PathBuf>,
    /// Cache compiled components on disk.
    pub cache: bool,
    /// Where components pulled from OCI registries are kept, by digest
    /// (whatever `cache` says: a pulled component must be on disk to load).
    /// Default: `$XDG_CACHE_HOME/setpoint/oci` or `~/.cache/setpoint/oci`.
    pub oci_cache_dir: Option<PathBuf>,
    /// How often the engine's epoch advances: the granularity of time limits.
    #[serde(with = "humantime_serde")]
    pub epoch_tick: Duration,
    /// Use wasmtime's pooling allocator (fast instantiation, memory reserved up
    /// front). With `false`, instances are allocated on demand.
    pub pooling: bool,
    /// The most instances alive at once across all plugins (pooling only).
    pub max_instances: u32,
    /// The largest memory limit any plugin may be given, in MiB (pooling only).
    pub max_memory_mib: u64,
    /// Threads that run controllers and so every plugin call, apart from the
    /// threads that serve the API and the store. 0 (the default): one fewer
    /// than the machine has cores, and at least one, so busy plugins always
    /// leave a core to the API.
    pub plugin_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            cache: true,
            oci_cache_dir: None,
            epoch_tick: Duration::from_millis(10),
            pooling: true,
            max_instances: 256,
            max_memory_mib: 1024,
            plugin_threads: 0,
        }
    }
}

impl RuntimeConfig {
    /// The plugin threads in effect (see [`RuntimeConfig::plugin_threads`]).
    pub fn plugin_threads(&self) -> usize {
        if self.plugin_threads > 0 {
            return self.plugin_threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_sub(1).max(1)
    }

    /// The cache directory in effect, if caching is on.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if !self.cache {
            return None;
        }
        if let Some(dir) = &self.cache_dir {
            return Some(dir.clone());
        }
        Some(cache_base()?.join("components"))
    }

    /// Where pulled components are kept (see [`RuntimeConfig::oci_cache_dir`]);
    /// without XDG_CACHE_HOME or HOME, a folder in the system's temporary one.
    pub fn oci_cache_dir(&self) -> PathBuf {
        if let Some(dir) = &self.oci_cache_dir {
            return dir.clone();
        }
        cache_base().map_or_else(
            || std::env::temp_dir().join("setpoint-oci"),
            |b| b.join("oci"),
        )
    }
}

/// `$XDG_CACHE_HOME/setpoint`, or `~/.cache/setpoint`.
fn cache_base() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("setpoint"))
}

/// How a worker gets the instance it calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceMode {
    /// Each worker keeps a warm instance and reuses it, recycling it after a trap,
    /// a timeout, or `recycle-after` calls. About 1 µs per call.
    #[default]
    Warm,
    /// A fresh instance for every call: nothing survives between reconciles.
    /// About 35–50 µs per call.
    Fresh,
}

/// Limits on one plugin's instances and calls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Limits {
    /// Linear memory per instance, in MiB. A call that grows past it fails.
    pub memory_mib: u64,
    /// The longest one call may run; past it the call is stopped and fails.
    #[serde(with = "humantime_serde")]
    pub max_reconcile_time: Duration,
    /// Tables per instance.
    pub tables: u32,
    /// Elements per table.
    pub table_elements: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mib: 128,
            max_reconcile_time: Duration::from_secs(5),
            tables: 20,
            table_elements: 100_000,
        }
    }
}

/// Capabilities an operator grants a plugin. The default grants nothing: no
/// files, no environment, no network, no stdio.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Grants {
    /// Host directories the plugin may use.
    pub dirs: Vec<DirGrant>,
    /// Environment variables the plugin sees.
    pub env: BTreeMap<String, String>,
    /// Let the plugin's stdout and stderr through to the host's.
    pub stdio: bool,
    /// Outgoing HTTP (`wasi:http/outgoing-handler`) to these hosts only.
    pub http: Option<HttpGrant>,
}

/// Outgoing HTTP granted to a plugin: where it may send requests, and the
/// limits on each.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct HttpGrant {
    /// Host patterns: `host`, `host:port`, `https://host[:port]` or
    /// `*.domain`. A request to anything else fails in the plugin.
    pub hosts: Vec<String>,
    /// The longest a request may take to connect, to get its response head,
    /// and between two pieces of its body; never more than the plugin's
    /// `max-reconcile-time`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The largest response body a request may read.
    pub max_response_bytes: u64,
}

impl Default for HttpGrant {
    fn default() -> Self {
        Self {
            hosts: Vec::new(),
            timeout: Duration::from_secs(10),
            max_response_bytes: 1 << 20,
        }
    }
}

/// One preopened directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DirGrant {
    /// The directory on the host. It is created if missing.
    pub host: PathBuf,
    /// Where the plugin sees it, e.g. `/data`.
    pub guest: String,
    /// Grant read access only.
    #[serde(default)]
    pub read_only: bool,
}

/// What a plugin asks to be granted, in its manifest's `[capabilities]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Capabilities {
    /// Directories, by the path the plugin sees (e.g. `/data`).
    pub dirs: Vec<DirRequest>,
    /// Environment variables, by name; the operator grants their values.
    pub env: Vec<String>,
    /// Its stdout and stderr through to the host's.
    pub stdio: bool,
    /// Outgoing HTTP, to the hosts it names.
    pub http: Option<HttpCapability>,
}

/// The outgoing HTTP a plugin asks for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct HttpCapability {
    /// Host patterns, as in [`HttpGrant::hosts`]; each must be covered by a
    /// pattern the operator grants.
    pub hosts: Vec<String>,
}

/// One directory a plugin asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DirRequest {
    /// Where the plugin sees it, e.g. `/data`.
    pub guest: String,
    /// Read access is enough.
    #[serde(default)]
    pub read_only: bool,
}

impl Capabilities {
    /// The grants for this request out of what the operator granted `plugin`
    /// (`granted`, or nothing): only what was asked for, so a plugin never
    /// holds more than it asked. `Err` names the first capability asked for
    /// and not granted, and how to grant it.
    pub fn granted_by(&self, plugin: &str, granted: Option<&Grants>) -> Result<Grants, String> {
        let none = Grants::default();
        let granted = granted.unwrap_or(&none);
        let refuse = |what: String, how: &str| {
            Err(format!(
                "plugin {plugin} asks for {what}, which is not granted: grant it in the \
                 daemon's configuration under [grants.{plugin}] ({how}), or remove it from \
                 the plugin's manifest"
            ))
        };
        let mut grants = Grants::default();
        for want in &self.dirs {
            let Some(dir) = granted.dirs.iter().find(|d| d.guest == want.guest) else {
                return refuse(
                    format!("directory {}", want.guest),
                    &format!("dirs = [{{ host = \"...\", guest = \"{}\" }}]", want.guest),
                );
            };
            if dir.read_only && !want.read_only {
                return refuse(
                    format!("write access to directory {}", want.guest),
                    "it is granted read-only",
                );
            }
            grants.dirs.push(DirGrant {
                read_only: dir.read_only || want.read_only,
                ..dir.clone()
            });
        }
        for name in &self.env {
            let Some(value) = granted.env.get(name) else {
                return refuse(
                    format!("environment variable {name}"),
                    &format!("env = {{ {name} = \"...\" }}"),
                );
            };
            grants.env.insert(name.clone(), value.clone());
        }
        if self.stdio {
            if !granted.stdio {
                return refuse("stdio".into(), "stdio = true");
            }
            grants.stdio = true;
        }
        if let Some(want) = &self.http {
            grants.http = Some(http_granted(plugin, want, granted.http.as_ref())?);
        }
        Ok(grants)
    }
}

/// The HTTP grant for what a plugin asked: the hosts it asked for, each
/// covered by a pattern the operator granted, with the operator's limits.
fn http_granted(
    plugin: &str,
    want: &HttpCapability,
    granted: Option<&HttpGrant>,
) -> Result<HttpGrant, String> {
    let manifest = |e: String| format!("plugin {plugin}'s [capabilities.http]: {e}");
    let operator = |e: String| format!("[grants.{plugin}.http]: {e}");
    let Some(granted) = granted else {
        return Err(format!(
            "plugin {plugin} asks for outgoing HTTP to {}, which is not granted: grant it in \
             the daemon's configuration under [grants.{plugin}] (http = {{ hosts = [...] }}), \
             or remove [capabilities.http] from the plugin's manifest",
            want.hosts.join(", ")
        ));
    };
    let allowed = granted
        .hosts
        .iter()
        .map(|h| HostPattern::parse(h).map_err(operator))
        .collect::<Result<Vec<_>, _>>()?;
    for host in &want.hosts {
        let asked = HostPattern::parse(host).map_err(manifest)?;
        if !allowed.iter().any(|a| a.covers(&asked)) {
            return Err(format!(
                "plugin {plugin} asks for outgoing HTTP to {host}, which is not granted: the \
                 daemon's [grants.{plugin}] allows http hosts [{}]; add `{host}` there, or \
                 remove it from the plugin's manifest",
                granted.hosts.join(", ")
            ));
        }
    }
    Ok(HttpGrant {
        hosts: want.hosts.clone(),
        ..granted.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operator() -> Grants {
        Grants {
            dirs: vec![
                DirGrant {
                    host: "/srv/out".into(),
                    guest: "/data".into(),
                    read_only: false,
                },
                DirGrant {
                    host: "/etc/app".into(),
                    guest: "/config".into(),
                    read_only: true,
                },
            ],
            env: BTreeMap::from([
                ("REGION".to_string(), "eu".to_string()),
                ("TOKEN".to_string(), "s3cret".to_string()),
            ]),
            stdio: false,
            http: Some(HttpGrant {
                hosts: vec!["*.example.com".into(), "http://127.0.0.1:8080".into()],
                timeout: Duration::from_secs(3),
                max_response_bytes: 4096,
            }),
        }
    }

    #[test]
    fn a_plugin_gets_only_what_it_asked_for() {
        let asked = Capabilities {
            dirs: vec![DirRequest {
                guest: "/data".into(),
                read_only: true,
            }],
            env: vec!["REGION".into()],
            ..Capabilities::default()
        };
        let grants = asked.granted_by("files", Some(&operator())).unwrap();
        assert_eq!(grants.dirs.len(), 1);
        assert!(grants.dirs[0].read_only, "asked read-only, so read-only");
        assert_eq!(grants.env.len(), 1, "TOKEN was not asked for");
        assert!(!grants.stdio);
        assert!(grants.http.is_none(), "HTTP was not asked for");
        assert_eq!(
            Capabilities::default().granted_by("files", None).unwrap(),
            Grants::default()
        );
    }

    #[test]
    fn http_is_granted_for_the_hosts_asked_with_the_operators_limits() {
        let asked = Capabilities {
            http: Some(HttpCapability {
                hosts: vec![
                    "https://api.example.com".into(),
                    "http://127.0.0.1:8080".into(),
                ],
            }),
            ..Capabilities::default()
        };
        let http = asked
            .granted_by("hook", Some(&operator()))
            .unwrap()
            .http
            .unwrap();
        assert_eq!(
            http.hosts,
            ["https://api.example.com", "http://127.0.0.1:8080"]
        );
        assert_eq!(http.timeout, Duration::from_secs(3));
        assert_eq!(http.max_response_bytes, 4096);
        // Without any HTTP grant, the request names how to grant it.
        let err = asked.granted_by("hook", None).unwrap_err();
        assert!(
            err.contains("[grants.hook]") && err.contains("http = {"),
            "{err}"
        );
        // A bad pattern in the manifest is named as the manifest's.
        let bad = Capabilities {
            http: Some(HttpCapability {
                hosts: vec!["ftp://x".into()],
            }),
            ..Capabilities::default()
        };
        let err = bad.granted_by("hook", Some(&operator())).unwrap_err();
        assert!(
            err.contains("[capabilities.http]") && err.contains("ftp://x"),
            "{err}"
        );
    }

    #[test]
    fn what_is_not_granted_is_named() {
        let cases = [
            (
                Capabilities {
                    dirs: vec![DirRequest {
                        guest: "/cache".into(),
                        read_only: false,
                    }],
                    ..Capabilities::default()
                },
                "directory /cache",
            ),
            (
                Capabilities {
                    dirs: vec![DirRequest {
                        guest: "/config".into(),
                        read_only: false,
                    }],
                    ..Capabilities::default()
                },
                "write access to directory /config",
            ),
            (
                Capabilities {
                    env: vec!["HOME".into()],
                    ..Capabilities::default()
                },
                "environment variable HOME",
            ),
            (
                Capabilities {
                    stdio: true,
                    ..Capabilities::default()
                },
                "stdio",
            ),
            (
                Capabilities {
                    http: Some(HttpCapability {
                        hosts: vec!["api.example.org".into()],
                    }),
                    ..Capabilities::default()
                },
                "outgoing HTTP to api.example.org",
            ),
            (
                Capabilities {
                    http: Some(HttpCapability {
                        hosts: vec!["127.0.0.1".into()],
                    }),
                    ..Capabilities::default()
                },
                "outgoing HTTP to 127.0.0.1",
            ),
        ];
        for (asked, named) in cases {
            let err = asked.granted_by("files", Some(&operator())).unwrap_err();
            assert!(err.contains(named), "{err}");
            assert!(err.contains("files"), "{err}");
        }
    }
}
