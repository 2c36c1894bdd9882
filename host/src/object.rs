//! The object model: Kubernetes-style objects of desired state, and their keys.
//!
//! An [`Object`] carries `apiVersion`, `kind`, `metadata`, `spec` and `status`. The
//! host owns `metadata.uid`, `generation`, `resourceVersion` and
//! `deletionTimestamp`; users write `name`, `namespace`, `labels` and `spec`.
//! [`Object::parse`] accepts YAML or JSON and says exactly what is wrong with a
//! manifest it refuses.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The `apiVersion` given to objects whose manifest leaves it out.
pub const DEFAULT_API_VERSION: &str = "setpoint.dev/v1";

/// One object of desired state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Object {
    #[serde(default = "default_api_version")]
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// An object's metadata.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub resource_version: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
    /// Set when the object was deleted; it stays until its finalizers are done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<u64>,
}

fn default_api_version() -> String {
    DEFAULT_API_VERSION.to_string()
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("the manifest is not valid YAML or JSON: {0}")]
    Syntax(String),
    #[error("the manifest is not a valid object: {0}")]
    Shape(String),
    /// `value` is already [`quote`]d.
    #[error("invalid {field} {value}: {why}")]
    Invalid {
        field: String,
        value: String,
        why: &'static str,
    },
}

/// The most characters of user input an error message quotes.
pub const QUOTE_MAX: usize = 100;

/// `input` shortened for an error message: at most [`QUOTE_MAX`] characters,
/// and an ellipsis (`…`) where the rest was cut.
pub fn shorten(input: &str) -> std::borrow::Cow<'_, str> {
    match input.char_indices().nth(QUOTE_MAX) {
        None => input.into(),
        Some((cut, _)) => format!("{}…", &input[..cut]).into(),
    }
}

/// User input quoted for an error message (`"..."`, escaped like `{:?}`),
/// [`shorten`]ed, so a long input is not echoed whole.
pub fn quote(input: &str) -> String {
    format!("{:?}", shorten(input))
}

impl Object {
    /// A new object with the default `apiVersion` and an empty spec.
    pub fn new(kind: &str, namespace: &str, name: &str, spec: serde_json::Value) -> Self {
        Self {
            api_version: default_api_version(),
            kind: kind.to_string(),
            metadata: Metadata {
                name: name.to_string(),
                namespace: namespace.to_string(),
                ..Metadata::default()
            },
            spec,
            status: None,
        }
    }

    /// Parse one manifest, YAML or JSON (JSON is YAML), and validate it.
    pub fn parse(text: &str) -> Result<Self, ObjectError> {
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| ObjectError::Syntax(e.to_string()))?;
        let object: Object =
            serde_yaml_ng::from_value(value).map_err(|e| ObjectError::Shape(e.to_string()))?;
        object.validate()?;
        Ok(object)
    }

    /// Check the fields a user writes: kind, name, namespace and labels (see
    /// [`check_name`], [`check_label_key`] and [`check_label_value`]).
    pub fn validate(&self) -> Result<(), ObjectError> {
        validate_kind(&self.kind)?;
        check_name("metadata.name", &self.metadata.name)?;
        if !self.metadata.namespace.is_empty() {
            check_name("metadata.namespace", &self.metadata.namespace)?;
        }
        for (key, value) in &self.metadata.labels {
            check_label_key(key)?;
            check_label_value(key, value)?;
        }
        Ok(())
    }

    /// The key this object is stored and queued under.
    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            kind: self.kind.clone(),
            namespace: self.metadata.namespace.clone(),
            name: self.metadata.name.clone(),
        }
    }

    /// True once the object was deleted and waits for its finalizers.
    pub fn is_deleting(&self) -> bool {
        self.metadata.deletion_timestamp.is_some()
    }

    /// True if every label in `selector` is on this object with the same value.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector
            .iter()
            .all(|(k, v)| self.metadata.labels.get(k) == Some(v))
    }
}

fn invalid(field: impl Into<String>, value: &str, why: &'static str) -> ObjectError {
    ObjectError::Invalid {
        field: field.into(),
        value: quote(value),
        why,
    }
}

/// A kind: 1 to 253 letters, digits, '-', '_' and '.'.
fn validate_kind(kind: &str) -> Result<(), ObjectError> {
    if kind.is_empty() {
        return Err(invalid("kind", kind, "it must not be empty"));
    }
    if kind.len() > 253 {
        return Err(invalid("kind", kind, "it must be at most 253 characters"));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !kind.chars().all(allowed) {
        return Err(invalid(
            "kind",
            kind,
            "it may contain only letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

/// The rule of [`check_name`], as refusals state it.
pub const NAME_RULE: &str = "a name (and a namespace) must be a DNS-1123 subdomain: at most 253 \
     characters of lower-case letters, digits, '-' and '.', where each '.'-separated part \
     starts and ends with a letter or digit (e.g. my-name or web.v2)";

/// The rule of [`check_label_key`], as refusals state it.
pub const LABEL_KEY_RULE: &str = "a label key is an optional prefix and '/' (the prefix a \
     DNS-1123 subdomain: at most 253 characters of lower-case letters, digits, '-' and '.') \
     and a name of at most 63 letters, digits, '-', '_' and '.' that starts and ends with a \
     letter or digit (e.g. app or example.com/tier)";

/// The rule of [`check_label_value`], as refusals state it.
pub const LABEL_VALUE_RULE: &str = "a label value is empty, or at most 63 letters, digits, \
     '-', '_' and '.' that starts and ends with a letter or digit";

/// True if `s` is a DNS-1123 subdomain (Kubernetes' rule for object names):
/// at most 253 characters, '.'-separated parts of lower-case letters, digits
/// and '-' that start and end with a letter or digit.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    let part = |p: &str| {
        let bytes = p.as_bytes();
        !bytes.is_empty()
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-'
    };
    s.len() <= 253 && s.split('.').all(part)
}

/// True if `s` is a Kubernetes qualified name's name part (and a non-empty
/// label value): 1 to 63 letters, digits, '-', '_' and '.', starting and ending
/// with a letter or digit.
fn is_label_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

/// Check an object name or namespace (`field` names which) against [`NAME_RULE`].
pub fn check_name(field: &str, value: &str) -> Result<(), ObjectError> {
    if is_dns1123_subdomain(value) {
        Ok(())
    } else {
        Err(invalid(field, value, NAME_RULE))
    }
}

/// Check a label key against [`LABEL_KEY_RULE`].
pub fn check_label_key(key: &str) -> Result<(), ObjectError> {
    let valid = match key.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    };
    if valid {
        Ok(())
    } else {
        Err(invalid("label key", key, LABEL_KEY_RULE))
    }
}

/// Check the value of label `key` against [`LABEL_VALUE_RULE`].
pub fn check_label_value(key: &str, value: &str) -> Result<(), ObjectError> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(invalid(
            format!("value of label {}", quote(key)),
            value,
            LABEL_VALUE_RULE,
        ))
    }
}

/// The identity of an object: kind, namespace and name. Written `kind:namespace/name`,
/// or `kind:name` in the default (empty) namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}:{}", self.kind, self.name)
        } else {
            write!(f, "{}:{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl FromStr for ObjectKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            format!(
                "{} is not an object key: expected kind:namespace/name",
                quote(s)
            )
        })?;
        let (namespace, name) = rest.split_once('/').unwrap_or(("", rest));
        if kind.is_empty() || name.is_empty() {
            return Err(format!(
                "{} is not an object key: expected kind:namespace/name",
                quote(s)
            ));
        }
        Ok(ObjectKey::new(kind, namespace, name))
    }
}

/// Every object in a YAML stream of one or more documents (`---` between them).
/// Empty documents are skipped. Fails on the first invalid one, naming it.
pub fn parse_all(text: &str) -> Result<Vec<Object>, ObjectError> {
    let mut objects = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(doc)
            .map_err(|e| ObjectError::Syntax(format!("document {}: {e}", i + 1)))?;
        if value.is_null() {
            continue;
        }
        let object: Object = serde_yaml_ng::from_value(value)
            .map_err(|e| ObjectError::Shape(format!("document {}: {e}", i + 1)))?;
        object.validate()?;
        objects.push(object);
    }
    Ok(objects)
}

/// Why a key is being reconciled. Mirrors the WIT `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Updated,
    Deleted,
    Resynced,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_yaml_and_defaults_api_version() {
        let o = Object::parse("kind: File\nmetadata:\n  name: a\nspec:\n  content: hi\n").unwrap();
        assert_eq!(o.api_version, DEFAULT_API_VERSION);
        assert_eq!(o.key().to_string(), "File:a");
        assert_eq!(o.spec["content"], "hi");
    }

    #[test]
    fn parse_accepts_json() {
        let o =
            Object::parse(r#"{"kind":"File","metadata":{"name":"a","namespace":"ns"}}"#).unwrap();
        assert_eq!(o.key().to_string(), "File:ns/a");
    }

    #[test]
    fn parse_names_the_bad_field() {
        let err = Object::parse("kind: File\nmetadata:\n  name: 'a b'\n").unwrap_err();
        assert!(err.to_string().contains("metadata.name"), "{err}");
        let err = Object::parse("kind: File\nmetadata:\n  name: a\n  nmae: b\n").unwrap_err();
        assert!(err.to_string().contains("nmae"), "{err}");
        let err = Object::parse("kind: [").unwrap_err();
        assert!(matches!(err, ObjectError::Syntax(_)), "{err}");
    }

    fn named(name: &str, namespace: &str) -> Object {
        Object::new("File", namespace, name, serde_json::json!({}))
    }

    #[test]
    fn names_and_namespaces_follow_the_dns_1123_subdomain_grammar() {
        let long = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        assert_eq!(long.len(), 253);
        for good in ["a", "0", "my-name", "web.v2", "a-b.c-d.e", long.as_str()] {
            assert!(named(good, "").validate().is_ok(), "name {good:?}");
            assert!(named("a", good).validate().is_ok(), "namespace {good:?}");
        }
        let too_long = format!("{long}c");
        for bad in [
            ".",
            "..",
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a..b",
            "a.-b",
            ".a",
            "a.",
            "a b",
            "ä",
            "a/b",
            too_long.as_str(),
        ] {
            let err = named(bad, "").validate().unwrap_err().to_string();
            assert!(err.contains("metadata.name"), "{bad:?}: {err}");
            assert!(err.contains("DNS-1123 subdomain"), "states the rule: {err}");
            if !bad.is_empty() {
                let err = named("a", bad).validate().unwrap_err().to_string();
                assert!(err.contains("metadata.namespace"), "{bad:?}: {err}");
            }
        }
    }

    #[test]
    fn label_keys_and_values_follow_the_kubernetes_label_rules() {
        let with = |k: &str, v: &str| {
            let mut o = named("a", "");
            o.metadata.labels.insert(k.into(), v.into());
            o.validate()
        };
        let name63 = "x".repeat(63);
        for key in [
            "app",
            "App_1",
            "a.b-c_d",
            "example.com/tier",
            "setpoint.dev/Team",
            name63.as_str(),
        ] {
            assert!(with(key, "v").is_ok(), "key {key:?}");
        }
        let name64 = "x".repeat(64);
        let prefix254 = format!("{}/a", "p".repeat(254));
        for key in [
            "",
            "-a",
            "a-",
            "_a",
            "a b",
            "/a",
            "a/",
            "a/b/c",
            "Example.com/a",
            "a..b/c",
            name64.as_str(),
            prefix254.as_str(),
        ] {
            let err = with(key, "v").unwrap_err().to_string();
            assert!(err.contains("label key"), "{key:?}: {err}");
            assert!(err.contains("optional prefix"), "states the rule: {err}");
        }
        for value in ["", "web", "Web_1.x-y", name63.as_str()] {
            assert!(with("app", value).is_ok(), "value {value:?}");
        }
        for value in ["-web", "web.", "a b", "a/b", name64.as_str()] {
            let err = with("app", value).unwrap_err().to_string();
            assert!(err.contains("value of label \"app\""), "{value:?}: {err}");
            assert!(err.contains("at most 63"), "states the rule: {err}");
        }
    }

    #[test]
    fn kinds_keep_their_rule() {
        for good in ["File", "my_Kind.v1", "a-b"] {
            let o = Object::new(good, "", "a", serde_json::json!({}));
            assert!(o.validate().is_ok(), "{good:?}");
        }
        for bad in ["", "a b", "a/b"] {
            let o = Object::new(bad, "", "a", serde_json::json!({}));
            assert!(o.validate().unwrap_err().to_string().contains("kind"));
        }
    }

    #[test]
    fn errors_quote_at_most_a_hundred_characters_of_the_input() {
        let huge = "X".repeat(10_000);
        let err = named(&huge, "").validate().unwrap_err().to_string();
        assert!(err.len() < 600, "{} characters: {err}", err.len());
        assert!(err.contains(&format!("\"{}…\"", "X".repeat(100))), "{err}");
        let err = format!("{huge}/x").parse::<ObjectKey>().unwrap_err();
        assert!(err.len() < 300, "{err}");
        assert_eq!(quote("short"), "\"short\"");
        assert_eq!(shorten(&"é".repeat(150)), format!("{}…", "é".repeat(100)));
    }

    #[test]
    fn parse_all_reads_every_document_and_names_the_bad_one() {
        let objects =
            parse_all("kind: A\nmetadata: {name: a}\n---\n---\nkind: B\nmetadata: {name: b}\n")
                .unwrap();
        assert_eq!(objects.len(), 2);
        let err = parse_all("kind: A\nmetadata: {name: a}\n---\nkind: B\n").unwrap_err();
        assert!(err.to_string().contains("document 2"), "{err}");
    }

    #[test]
    fn key_round_trips_through_its_text_form() {
        for text in ["File:a", "File:ns/a"] {
            assert_eq!(text.parse::<ObjectKey>().unwrap().to_string(), text);
        }
        assert!("nokind".parse::<ObjectKey>().is_err());
    }

    #[test]
    fn selector_matches_only_when_every_label_matches() {
        let mut o = Object::new("File", "", "a", serde_json::json!({}));
        o.metadata.labels.insert("app".into(), "web".into());
        let mut sel = BTreeMap::new();
        assert!(o.matches(&sel));
        sel.insert("app".into(), "web".into());
        assert!(o.matches(&sel));
        sel.insert("tier".into(), "db".into());
        assert!(!o.matches(&sel));
    }
}
