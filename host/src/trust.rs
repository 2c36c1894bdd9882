//! Who published a plugin: Ed25519 keys, detached signatures, and the trust
//! policy the registry checks before a component is loaded or swapped in.
//!
//! The crypto is `ed25519-dalek`'s (strict verification); keys come from the
//! OS's random source through `getrandom`. Nothing here is hand-written
//! crypto: this module only names keys and frames what is signed.
//!
//! - A signature covers [`Signed`]: the component's sha256 and its manifest's
//!   `name` and `version` (empty when it has none), framed as one text, so a
//!   signature for one file or one manifest never passes for another.
//! - Signatures travel beside the component, `NAME.wasm.sig`, one line per
//!   signer: `setpoint-signature ed25519 <key-id> <hex signature>`.
//! - Keys are one line each: `setpoint-secret-key ed25519 <hex>` and
//!   `setpoint-public-key ed25519 <hex>`; a key's id is the first 16 hex
//!   digits of the sha256 of its public bytes.
//!
//! Guarantee: [`Policy::check`] passes a component only if the policy
//! requires nothing of it, or at least `minimum-matches` of the keys it
//! accepts signed exactly this [`Signed`]; otherwise it says which check
//! failed and which keys were tried.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const SECRET: &str = "setpoint-secret-key ed25519";
const PUBLIC: &str = "setpoint-public-key ed25519";
const SIGNATURE: &str = "setpoint-signature ed25519";

/// What a signature covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    /// The component's sha256, in hex.
    pub sha256: String,
    /// Its manifest's `name`, or empty.
    pub name: String,
    /// Its manifest's `version`, or empty.
    pub version: String,
}

impl Signed {
    fn message(&self) -> Vec<u8> {
        format!(
            "setpoint plugin signature v1\nsha256:{}\nname:{}\nversion:{}\n",
            self.sha256.to_ascii_lowercase(),
            self.name,
            self.version
        )
        .into_bytes()
    }
}

/// Where a component's signatures are: `FILE.sig` beside it.
pub fn signature_path(component: &Path) -> PathBuf {
    let mut name = component.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

/// A public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parse `setpoint-public-key ed25519 <hex>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bytes = parse_line(text, PUBLIC, "public key")?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|e| format!("not an Ed25519 public key: {e}"))
    }

    /// The first 16 hex digits of the sha256 of the key's bytes.
    pub fn id(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))[..16].to_string()
    }

    pub fn to_text(&self) -> String {
        format!("{PUBLIC} {}", hex::encode(self.0.as_bytes()))
    }

    fn verifies(&self, signed: &Signed, signature: &Signature) -> bool {
        self.0.verify_strict(&signed.message(), signature).is_ok()
    }
}

/// A secret key.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A new key from the OS's random source.
    pub fn generate() -> Result<Self, String> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| format!("no randomness from the OS: {e}"))?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// Parse `setpoint-secret-key ed25519 <hex>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        parse_line(text, SECRET, "secret key").map(|b| Self(SigningKey::from_bytes(&b)))
    }

    pub fn to_text(&self) -> String {
        format!("{SECRET} {}", hex::encode(self.0.to_bytes()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// One signature line for `signed`.
    pub fn sign(&self, signed: &Signed) -> String {
        let signature = self.0.sign(&signed.message());
        format!(
            "{SIGNATURE} {} {}",
            self.public().id(),
            hex::encode(signature.to_bytes())
        )
    }
}

fn parse_line<const N: usize>(text: &str, prefix: &str, what: &str) -> Result<[u8; N], String> {
    let text = text.trim();
    let hex_part = text.strip_prefix(prefix).map(str::trim).ok_or_else(|| {
        format!("not a Setpoint {what}: it should read `{prefix} <hex>` (`setpoint plugin keygen` writes one)")
    })?;
    let bytes = hex::decode(hex_part).map_err(|_| format!("the {what} is not hex"))?;
    bytes
        .try_into()
        .map_err(|_| format!("the {what} is not {N} bytes long"))
}

/// The signature lines of a `.sig` file: (key id, signature). Lines that are
/// not signatures are an error naming the line.
pub fn parse_signatures(text: &str) -> Result<Vec<(String, Signature)>, String> {
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || {
            format!(
                "line {} is not `{SIGNATURE} <key-id> <hex>` (`setpoint plugin sign` writes them)",
                i + 1
            )
        };
        let rest = line.strip_prefix(SIGNATURE).ok_or_else(bad)?;
        let mut parts = rest.split_whitespace();
        let (Some(id), Some(sig), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let bytes: [u8; 64] = hex::decode(sig)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        found.push((id.to_string(), Signature::from_bytes(&bytes)));
    }
    Ok(found)
}

/// A signature rule: globally, or for one plugin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Rule {
    /// Refuse components without enough valid signatures.
    pub require_signature: bool,
    /// The names of the trusted keys accepted; empty: every trusted key.
    pub any_of: Vec<String>,
    /// How many distinct accepted keys must have signed.
    pub minimum_matches: usize,
}

impl Default for Rule {
    fn default() -> Self {
        Self {
            require_signature: false,
            any_of: Vec::new(),
            minimum_matches: 1,
        }
    }
}

/// The trust policy: trusted keys by name, a rule for every plugin, and
/// rules for some by name. The default requires nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    pub keys: BTreeMap<String, PublicKey>,
    pub rule: Rule,
    pub plugins: BTreeMap<String, Rule>,
}

impl Policy {
    /// `Err` if `plugin`'s rule requires signatures and `signatures` (the
    /// `.sig` file's text, if there is one) does not hold enough valid ones
    /// over `signed`; the message names the check and the keys tried.
    pub fn check(
        &self,
        plugin: &str,
        signed: &Signed,
        signatures: Option<&str>,
    ) -> Result<(), String> {
        let rule = self.plugins.get(plugin).unwrap_or(&self.rule);
        if !rule.require_signature {
            return Ok(());
        }
        let accepted: Vec<(&String, &PublicKey)> = self
            .keys
            .iter()
            .filter(|(name, _)| rule.any_of.is_empty() || rule.any_of.contains(name))
            .collect();
        let tried = accepted
            .iter()
            .map(|(name, key)| format!("{name} ({})", key.id()))
            .collect::<Vec<_>>()
            .join(", ");
        let need = rule.minimum_matches.max(1);
        let Some(text) = signatures else {
            return Err(format!(
                "plugin {plugin} is not signed, and the trust policy requires {need} signature(s) \
                 by: {tried}. Sign it with `setpoint plugin sign FILE --key KEY` (the signature \
                 goes beside it, FILE.sig)"
            ));
        };
        let signatures =
            parse_signatures(text).map_err(|e| format!("plugin {plugin}'s signature file: {e}"))?;
        let mut matched = Vec::new();
        let mut failed = Vec::new();
        let mut unknown = Vec::new();
        for (id, signature) in &signatures {
            match accepted.iter().find(|(_, key)| &key.id() == id) {
                Some((name, key)) if key.verifies(signed, signature) => {
                    if !matched.contains(name) {
                        matched.push(*name);
                    }
                }
                Some((name, _)) => failed.push(format!("{name} ({id})")),
                None => unknown.push(id.clone()),
            }
        }
        if matched.len() >= need {
            return Ok(());
        }
        let mut why = Vec::new();
        if !failed.is_empty() {
            why.push(format!(
                "the signature by {} does not match: the component or its manifest's name or \
                 version changed after it was signed",
                failed.join(", ")
            ));
        }
        if !unknown.is_empty() {
            why.push(format!(
                "it is signed by key(s) this policy does not accept: {}",
                unknown.join(", ")
            ));
        }
        if signatures.is_empty() {
            why.push("its signature file holds no signature".into());
        }
        Err(format!(
            "plugin {plugin} has {} valid signature(s) of the {need} the trust policy requires \
             ({}); keys tried: {tried}",
            matched.len(),
            why.join("; "),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed() -> Signed {
        Signed {
            sha256: "ab".repeat(32),
            name: "hello".into(),
            version: "1.0.0".into(),
        }
    }

    fn policy(keys: &[(&str, &SecretKey)], minimum: usize) -> Policy {
        Policy {
            keys: keys
                .iter()
                .map(|(n, k)| (n.to_string(), k.public()))
                .collect(),
            rule: Rule {
                require_signature: true,
                any_of: Vec::new(),
                minimum_matches: minimum,
            },
            plugins: BTreeMap::new(),
        }
    }

    #[test]
    fn keys_round_trip_through_their_text() {
        let key = SecretKey::generate().unwrap();
        let again = SecretKey::parse(&key.to_text()).unwrap();
        assert_eq!(again.public(), key.public());
        assert_eq!(
            PublicKey::parse(&key.public().to_text()).unwrap(),
            key.public()
        );
        let err = PublicKey::parse("ssh-ed25519 AAAA").unwrap_err();
        assert!(err.contains("setpoint plugin keygen"), "{err}");
    }

    #[test]
    fn a_valid_signature_passes_and_any_change_fails() {
        let alice = SecretKey::generate().unwrap();
        let p = policy(&[("alice", &alice)], 1);
        let sig = alice.sign(&signed());
        p.check("hello", &signed(), Some(&sig)).unwrap();
        for changed in [
            Signed {
                sha256: "cd".repeat(32),
                ..signed()
            },
            Signed {
                name: "other".into(),
                ..signed()
            },
            Signed {
                version: "1.0.1".into(),
                ..signed()
            },
        ] {
            let err = p.check("hello", &changed, Some(&sig)).unwrap_err();
            assert!(err.contains("does not match"), "{err}");
            assert!(err.contains("alice"), "{err}");
        }
    }

    #[test]
    fn unsigned_or_signed_by_an_untrusted_key_is_refused_naming_the_keys_tried() {
        let alice = SecretKey::generate().unwrap();
        let mallory = SecretKey::generate().unwrap();
        let p = policy(&[("alice", &alice)], 1);
        let err = p.check("hello", &signed(), None).unwrap_err();
        assert!(err.contains("not signed"), "{err}");
        assert!(
            err.contains(&format!("alice ({})", alice.public().id())),
            "{err}"
        );
        let err = p
            .check("hello", &signed(), Some(&mallory.sign(&signed())))
            .unwrap_err();
        assert!(err.contains("does not accept"), "{err}");
        assert!(err.contains(&mallory.public().id()), "{err}");
        let err = p.check("hello", &signed(), Some("garbage")).unwrap_err();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn minimum_matches_counts_distinct_accepted_keys() {
        let alice = SecretKey::generate().unwrap();
        let bob = SecretKey::generate().unwrap();
        let p = policy(&[("alice", &alice), ("bob", &bob)], 2);
        let one = alice.sign(&signed());
        let twice = format!("{one}\n{one}\n");
        let err = p.check("hello", &signed(), Some(&twice)).unwrap_err();
        assert!(err.contains("1 valid signature(s) of the 2"), "{err}");
        let both = format!("{one}\n{}\n", bob.sign(&signed()));
        p.check("hello", &signed(), Some(&both)).unwrap();
        // A per-plugin rule: only bob counts for `hello`.
        let mut p = policy(&[("alice", &alice), ("bob", &bob)], 1);
        p.plugins.insert(
            "hello".into(),
            Rule {
                require_signature: true,
                any_of: vec!["bob".into()],
                minimum_matches: 1,
            },
        );
        assert!(p.check("hello", &signed(), Some(&one)).is_err());
        p.check("other", &signed(), Some(&one)).unwrap();
    }

    #[test]
    fn no_policy_requires_nothing() {
        Policy::default().check("hello", &signed(), None).unwrap();
    }
}
