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
    #[error("invalid {field} {value:?}: {why}")]
    Invalid {
        field: &'static str,
        value: String,
        why: &'static str,
    },
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

    /// Check the fields a user writes: kind, name, namespace and labels.
    pub fn validate(&self) -> Result<(), ObjectError> {
        validate_name("kind", &self.kind, false)?;
        validate_name("metadata.name", &self.metadata.name, false)?;
        validate_name("metadata.namespace", &self.metadata.namespace, true)?;
        for key in self.metadata.labels.keys() {
            validate_name("label key", key, false)?;
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

fn validate_name(field: &'static str, value: &str, may_be_empty: bool) -> Result<(), ObjectError> {
    let invalid = |why| ObjectError::Invalid {
        field,
        value: value.to_string(),
        why,
    };
    if value.is_empty() {
        return if may_be_empty {
            Ok(())
        } else {
            Err(invalid("it must not be empty"))
        };
    }
    if value.len() > 253 {
        return Err(invalid("it must be at most 253 characters"));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !value.chars().all(allowed) {
        return Err(invalid(
            "it may contain only letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
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
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not an object key: expected kind:namespace/name"))?;
        let (namespace, name) = rest.split_once('/').unwrap_or(("", rest));
        if kind.is_empty() || name.is_empty() {
            return Err(format!(
                "{s:?} is not an object key: expected kind:namespace/name"
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
